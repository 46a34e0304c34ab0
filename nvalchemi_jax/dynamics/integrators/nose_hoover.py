"""NVT Nosé–Hoover chain dynamics (Martyna, Klein & Tuckerman 1992; integrator of
Martyna, Tuckerman, Tobias & Klein 1996).

Each system couples to its own chain of ``M = chain_length`` thermostats with
positions ``η_k`` (dimensionless) and momenta ``p_k`` (eV·fs), masses
``Q₁ = dof kT τ²`` and ``Q_k = kT τ²`` (eV·fs²) where ``dof`` are the system's
kinetic degrees of freedom (3 N − 3: the centre-of-mass momentum is conserved),
``T`` its target temperature and ``τ`` the thermostat time constant. The
equations of motion are

    dv/dt   = F/m − (p₁/Q₁) v
    dη_k/dt = p_k/Q_k
    dp₁/dt  = (2 K − dof kT) − p₁ p₂/Q₂
    dp_k/dt = (p_{k−1}²/Q_{k−1} − kT) − p_k p_{k+1}/Q_{k+1}     (last: no friction term)

and conserve the extended energy (:func:`nose_hoover_energy`)

    H = K + U + Σ_k p_k²/(2 Q_k) + dof kT η₁ + kT Σ_{k≥2} η_k.

A step is a half chain step (``dt/2``), velocity Verlet (``dt``), a half chain
step. The chain step is split into ``n_chain_steps`` sub-steps, each factorised
with the Suzuki–Yoshida weights (``yoshida_order`` of them: 1, 3, 5 or 7), so the
thermostat is integrated accurately even when ``τ`` is a few ``dt``.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import struct

from nvalchemi_jax import units
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics import thermo
from nvalchemi_jax.dynamics.base import Dynamics, StageState, check_positive, per_system
from nvalchemi_jax.dynamics.integrators.nve import drift, half_kick


def yoshida_weights(order: int) -> tuple[float, ...]:
    """Suzuki–Yoshida weights of a symmetric composition: 1 (2nd order), 3 (4th), 5 (4th,
    Suzuki's fractal) or 7 (6th order, Yoshida's solution A). They sum to 1."""
    if order == 1:
        return (1.0,)
    if order == 3:
        w = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
        return (w, 1.0 - 2.0 * w, w)
    if order == 5:
        w = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
        return (w, w, 1.0 - 4.0 * w, w, w)
    if order == 7:
        w1, w2, w3 = 0.784513610477560, 0.235573213359357, -1.17767998417887
        return (w1, w2, w3, 1.0 - 2.0 * (w1 + w2 + w3), w3, w2, w1)
    raise ValueError(f"yoshida_order must be 1, 3, 5 or 7, got {order!r}")


YOSHIDA_ORDERS = (1, 3, 5, 7)


def chain_masses(dof: jax.Array, kt: jax.Array, tau: jax.Array, chain_length: int) -> jax.Array:
    """``(S, M)`` thermostat masses in eV·fs²: ``Q₁ = dof kT τ²``, ``Q_k = kT τ²``.

    dof, kt (eV), tau (fs): ``(S,)``.
    """
    base = kt * tau * tau
    rest = jnp.broadcast_to(base[:, None], (base.shape[0], chain_length - 1))
    return jnp.concatenate([(dof * base)[:, None], rest], axis=1)


def chain_half_step(kinetic, eta, momenta, masses, kt, dof, duration, weights, n_chain_steps):
    """Propagate the chain and the particles' thermostat friction for ``duration (S,)`` fs.

    kinetic: ``(S,)`` eV, the particles' kinetic energy K. eta, momenta, masses:
    ``(S, M)`` (dimensionless, eV·fs, eV·fs²). kt: ``(S,)`` eV. dof: ``(S,)``.
    weights: Suzuki–Yoshida weights; n_chain_steps: sub-steps (a static int, unrolled).
    Returns ``(scale (S,), eta, momenta)``: multiply every velocity of a system by
    its ``scale``. Each sub-step of length δ is the symmetric splitting
    p_M…p₁ (δ/2, with friction factors exp(−δ/4 p_{k+1}/Q_{k+1}) around each kick),
    v and η (δ), p₁…p_M (δ/2).
    """
    m = momenta.shape[1]

    def force(k, ke, p):
        if k == 0:
            return 2.0 * ke - dof * kt
        return p[k - 1] * p[k - 1] / masses[:, k - 1] - kt

    def kick(k, ke, p, delta):
        if k == m - 1:                                     # the last has no friction
            return p[k] + 0.5 * delta * force(k, ke, p)
        damp = jnp.exp(-0.25 * delta * p[k + 1] / masses[:, k + 1])
        return (p[k] * damp + 0.5 * delta * force(k, ke, p)) * damp

    # Unrolled (n_chain_steps and the weights are small static numbers): cheap to
    # compile, and fast when called eagerly.
    p = [momenta[:, k] for k in range(m)]
    eta = [eta[:, k] for k in range(m)]
    scale, ke = jnp.ones_like(kinetic), kinetic
    for _ in range(n_chain_steps):
        for w in weights:
            delta = w * duration / n_chain_steps
            for k in reversed(range(m)):
                p[k] = kick(k, ke, p, delta)
            s = jnp.exp(-delta * p[0] / masses[:, 0])
            scale, ke = scale * s, ke * s * s
            eta = [eta[k] + delta * p[k] / masses[:, k] for k in range(m)]
            for k in range(m):
                p[k] = kick(k, ke, p, delta)
    return scale, jnp.stack(eta, axis=1), jnp.stack(p, axis=1)


def chain_energy(eta, momenta, masses, kt, dof) -> jax.Array:
    """``(S,)`` eV: the thermostats' share of the extended energy,
    Σ p_k²/(2 Q_k) + dof kT η₁ + kT Σ_{k≥2} η_k."""
    kinetic = 0.5 * jnp.sum(momenta * momenta / masses, axis=1)
    return kinetic + dof * kt * eta[:, 0] + kt * jnp.sum(eta[:, 1:], axis=1)


@struct.dataclass(kw_only=True, eq=False)
class NVTNoseHoover(Dynamics):
    """Canonical (NVT) molecular dynamics with a Nosé–Hoover chain per system.

    dt: time step, fs. temperature: target, K (> 0). tau: thermostat time
    constant, fs (default ``100 dt``); each may be a scalar or per system ``(S,)``.
    chain_length: thermostats per chain (static). yoshida_order: number of
    Suzuki–Yoshida weights, 1, 3, 5 or 7 (static). n_chain_steps: sub-steps of
    each half chain step (static).

    ``state.stage.system`` holds ``dt``, ``temperature``, ``tau`` ``(S,)`` and the
    chain ``eta`` (dimensionless) and ``p_eta`` (eV·fs), each ``(S, chain_length)``,
    starting at zero. Degrees of freedom are ``3 N_free − 3``: start from
    velocities with zero total momentum (``maxwell_boltzmann(..., remove_com=True)``),
    which the dynamics then conserves. :func:`nose_hoover_energy` is the conserved
    extended energy.

    Example::

        md = NVTNoseHoover(model=lj, dt=5.0, temperature=50.0, tau=250.0, n_steps=1000)
        state = md.init(batch, jax.random.key(0))
        h0 = nose_hoover_energy(state, batch, md)               # (S,) eV
        state = jax.jit(md.step)(state, batch)
        drift = nose_hoover_energy(state, batch, md) - h0
    """

    dt: float = 1.0
    temperature: float
    tau: float | None = None
    chain_length: int = struct.field(pytree_node=False, default=3)
    yoshida_order: int = struct.field(pytree_node=False, default=3)
    n_chain_steps: int = struct.field(pytree_node=False, default=1)

    conserves_momentum = True

    def validate(self):
        check_positive("NVTNoseHoover", dt=self.dt, temperature=self.temperature, tau=self.tau)
        for name in ("chain_length", "n_chain_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"NVTNoseHoover.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.yoshida_order, bool) or self.yoshida_order not in YOSHIDA_ORDERS:
            raise ValueError(f"NVTNoseHoover.yoshida_order must be one of {YOSHIDA_ORDERS} "
                             f"(the number of Suzuki–Yoshida weights), got {self.yoshida_order!r}")

    def init_stage(self, state, batch):
        dt = per_system(self.dt, batch)
        tau = 100.0 * dt if self.tau is None else per_system(self.tau, batch)
        zeros = jnp.zeros((batch.num_systems, self.chain_length), dt.dtype)
        return StageState(system={"dt": dt, "temperature": per_system(self.temperature, batch),
                                  "tau": tau, "eta": zeros, "p_eta": zeros})

    def _chain(self, state, batch):
        """Half a step (dt/2) of the chain; the velocities scaled accordingly."""
        p = state.stage.system
        dof = thermo.degrees_of_freedom(batch, remove_com=True).astype(p["dt"].dtype)
        kt = units.KB * p["temperature"]
        masses = chain_masses(dof, kt, p["tau"], self.chain_length)
        scale, eta, momenta = chain_half_step(
            thermo.kinetic_energy(state.velocities, batch), p["eta"], p["p_eta"], masses, kt, dof,
            0.5 * p["dt"], yoshida_weights(self.yoshida_order), self.n_chain_steps)
        velocities = state.velocities * gather_systems(scale, batch.system_index)[:, None]
        stage = state.stage.replace(system={**p, "eta": eta, "p_eta": momenta})
        return state.replace(velocities=velocities, stage=stage)

    def pre_update(self, state, batch):
        dt = state.stage.system["dt"]
        state = self._chain(state, batch)
        return drift(half_kick(state, batch, dt), batch, dt)

    def post_update(self, state, batch):
        state = half_kick(state, batch, state.stage.system["dt"])
        return self._chain(state, batch)


def nose_hoover_energy(state, batch, dynamics: NVTNoseHoover) -> jax.Array:
    """``(S,)`` eV: the conserved extended energy of :class:`NVTNoseHoover`,
    ``K + U + Σ p_k²/(2 Q_k) + dof kT η₁ + kT Σ_{k≥2} η_k``."""
    p = state.stage.system
    dof = thermo.degrees_of_freedom(batch, remove_com=True).astype(p["dt"].dtype)
    kt = units.KB * p["temperature"]
    masses = chain_masses(dof, kt, p["tau"], dynamics.chain_length)
    return (thermo.kinetic_energy(state.velocities, batch) + state.energy
            + chain_energy(p["eta"], p["p_eta"], masses, kt, dof))


__all__ = ["NVTNoseHoover", "chain_energy", "chain_half_step", "chain_masses", "nose_hoover_energy",
           "yoshida_weights"]
