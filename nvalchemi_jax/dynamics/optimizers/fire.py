"""FIRE and FIRE2: the fast inertial relaxation engine, one independent optimizer per system.

Both move atoms with damped fictitious dynamics of **unit masses** (as ASE does),
so ``dt`` sets a step length rather than a physical time: with forces in eV/Å a
step moves an atom by about ``(dt / 10.18 fs)² F`` Å. Every variable of the
algorithm — time step, mixing parameter α, the counter of downhill steps — is
per system in ``state.stage.system`` (shape ``(S,)``), and every reduction
(power ``P = F·v``, the norms ``|F|`` and ``|v|``, the length of the whole step)
runs over one system's atoms, so a system relaxes exactly as it would alone.
The fictitious velocities live in ``state.velocities`` (Å/fs); whatever the
batch carried is ignored: a system's first step starts from rest.

Convergence is the user's choice, usually ``ConvergenceHook.from_fmax(0.05)``
(largest per-atom force norm; fixed atoms have zero force and never move).

References: Bitzek et al., Phys. Rev. Lett. 97, 170201 (2006) (FIRE);
Guénolé et al., Comput. Mater. Sci. 175, 109584 (2020) (FIRE 2.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax import units
from nvalchemi_jax.batch import gather_systems, sum_systems
from nvalchemi_jax.dynamics.base import Dynamics, StageState, check_positive, per_system

#: ASE's FIRE defaults, expressed in fs (ASE's time unit is Å·sqrt(amu/eV) ≈ 10.18 fs).
ASE_DT = 0.1 * units.FS_PER_INTERNAL_TIME
ASE_DT_MAX = 1.0 * units.FS_PER_INTERNAL_TIME
ASE_DT_MIN = 2e-3 * units.FS_PER_INTERNAL_TIME


# ----------------------------------------------------------------- validation
def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_range(owner: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, **values) -> None:
    """Host-side: every value (scalar or per-system array) is finite and within [lo, hi]
    (open ends with ``lo_open``/``hi_open``); traced values and ``None`` are skipped."""
    for name, value in values.items():
        if value is None or not _concrete(value):
            continue
        arr = np.asarray(value, dtype=float)
        bad = ~np.isfinite(arr)
        if lo is not None:
            bad |= (arr <= lo) if lo_open else (arr < lo)
        if hi is not None:
            bad |= (arr >= hi) if hi_open else (arr > hi)
        if np.any(bad):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ValueError(f"{owner}.{name} must be finite and in {interval}, got {value!r}")


def check_count(owner: str, **values) -> None:
    """Host-side: every value is a non-negative integer (scalar or per-system array)."""
    for name, value in values.items():
        if value is None or not _concrete(value):
            continue
        arr = np.asarray(value)
        as_float = arr.astype(float)
        whole = np.isfinite(as_float) & (as_float == np.round(as_float))
        if arr.dtype == bool or not np.all(whole) or np.any(as_float < 0):
            raise ValueError(f"{owner}.{name} must be a non-negative integer, got {value!r}")


# ----------------------------------------------------------------- shared helpers
def system_dot(a: jax.Array, b: jax.Array, batch) -> jax.Array:
    """``(S,)`` sums over each system's atoms of ``a · b`` for ``(N, 3)`` arrays (padding dropped)."""
    return sum_systems(jnp.sum(a * b, axis=-1), batch)


def per_atom(x: jax.Array, batch) -> jax.Array:
    """``(S,)`` values as an ``(N, 1)`` column (padding atoms get 0)."""
    return gather_systems(x, batch.system_index)[:, None]


def atom_flag(flag: jax.Array, batch) -> jax.Array:
    """``(S,) bool`` flags as an ``(N, 1)`` column (padding atoms get False)."""
    return gather_systems(flag, batch.system_index, False)[:, None]


def safe_sqrt(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(x, 0.0))


def step_scale(dr2: jax.Array, max_step: jax.Array) -> jax.Array:
    """``(S,)`` factors shrinking each system's whole displacement (squared norm ``dr2``) to at
    most ``max_step`` Å, as ASE's FIRE does (one factor for the system, not per atom)."""
    norm = safe_sqrt(dr2)
    return jnp.where(norm > max_step, max_step / jnp.where(norm > 0, norm, 1.0), 1.0)


def fire_variables(sys: dict, power, f2, v2, started):
    """One ASE-FIRE decision per system, before the velocity update.

    power, f2, v2: ``(S,)`` F·v, |F|², |v|² over all of a system's degrees of freedom.
    started: ``(S,) bool``, False on a system's first step (it starts at rest).
    Returns ``(keep, push, sys)``: the new velocity is ``keep·v + push·F`` (then the
    ordinary ``v += dt F`` follows), and ``sys`` holds the updated dt, alpha, n_pos.
    """
    alpha = sys["alpha"]
    downhill = started & (power > 0.0)
    keep = jnp.where(downhill, 1.0 - alpha, 0.0)
    push = jnp.where(downhill, alpha * safe_sqrt(v2) / jnp.where(f2 > 0, safe_sqrt(f2), 1.0), 0.0)
    grow = downhill & (sys["n_pos"] > sys["n_min"])
    uphill = started & ~downhill
    dt = jnp.where(grow, jnp.minimum(sys["dt"] * sys["f_inc"], sys["dt_max"]), sys["dt"])
    dt = jnp.where(uphill, dt * sys["f_dec"], dt)
    alpha = jnp.where(grow, alpha * sys["f_alpha"], alpha)
    alpha = jnp.where(uphill, sys["alpha_start"], alpha)
    n_pos = jnp.where(downhill, sys["n_pos"] + 1, jnp.where(uphill, 0, sys["n_pos"]))
    return keep, push, {**sys, "dt": dt, "alpha": alpha, "n_pos": n_pos,
                        "started": jnp.ones_like(started)}


def unit_mass_kick(dt: jax.Array) -> jax.Array:
    """``(S,)`` factor turning a force (eV/Å) into a velocity change (Å/fs) over ``dt`` fs
    for a unit mass (1 amu)."""
    return dt * units.FORCE_TO_ACCELERATION


# ----------------------------------------------------------------- FIRE
@struct.dataclass(kw_only=True, eq=False)
class FIRE(Dynamics):
    """FIRE geometry optimizer with ASE's semantics and defaults, per system.

    Each step, for each system (F: forces at the current positions, v: velocities):
    if ``P = F·v > 0`` the velocity is mixed towards the force,
    ``v ← (1 − α) v + α |v| F/|F|``, and after more than ``n_min`` such steps in a
    row ``dt ← min(f_inc dt, dt_max)``, ``α ← f_alpha α``; otherwise ``v ← 0``,
    ``α ← alpha_start``, ``dt ← f_dec dt``. Then ``v += dt F`` (unit masses),
    ``Δr = dt v``, and the system's whole displacement is shrunk to a norm of at
    most ``max_step`` (ASE's clipping, over all atoms together). The first step
    starts from rest, as ASE's does. With the same parameters it follows ASE's
    ``FIRE`` step for step.

    dt: initial time step, fs (ASE's 0.1 time units ≈ 1.018 fs). dt_max: fs
    (ASE's 1.0 ≈ 10.18 fs). max_step: Å, norm of a system's whole displacement
    per step. n_min, f_inc, f_dec, alpha_start, f_alpha: as in ASE (Nmin, finc,
    fdec, astart, fa). Every number may be a scalar or per system ``(S,)``.

    Example::

        relax = FIRE(model, convergence=ConvergenceHook.from_fmax(0.05))
        result = relax.run(batch, max_steps=1000)
    """

    dt: float = ASE_DT
    max_step: float = 0.2
    dt_max: float = ASE_DT_MAX
    n_min: int = 5
    f_inc: float = 1.1
    f_dec: float = 0.5
    alpha_start: float = 0.1
    f_alpha: float = 0.99

    conserves_momentum = False
    #: A fused stage entering this optimizer sets the velocities to zero.
    zero_velocities_on_entry = True

    def validate(self):
        name = type(self).__name__
        check_positive(name, dt=self.dt, dt_max=self.dt_max, max_step=self.max_step)
        check_count(name, n_min=self.n_min)
        check_range(name, lo=1.0, f_inc=self.f_inc)
        check_range(name, lo=0.0, hi=1.0, lo_open=True, f_dec=self.f_dec, f_alpha=self.f_alpha)
        check_range(name, lo=0.0, hi=1.0, alpha_start=self.alpha_start)

    def fire_parameters(self, batch) -> dict:
        """The per-system ``(S,)`` variables and parameters FIRE keeps in the stage."""
        return {
            "dt": per_system(self.dt, batch), "dt_max": per_system(self.dt_max, batch),
            "max_step": per_system(self.max_step, batch),
            "n_min": per_system(self.n_min, batch, jnp.int32),
            "f_inc": per_system(self.f_inc, batch), "f_dec": per_system(self.f_dec, batch),
            "alpha_start": per_system(self.alpha_start, batch),
            "f_alpha": per_system(self.f_alpha, batch),
            "alpha": per_system(self.alpha_start, batch),
            "n_pos": jnp.zeros(batch.num_systems, jnp.int32),
            "started": jnp.zeros(batch.num_systems, bool),
        }

    def init_stage(self, state, batch):
        return StageState(system=self.fire_parameters(batch))

    def pre_update(self, state, batch):
        sys = state.stage.system
        f = state.forces
        v = jnp.where(atom_flag(sys["started"], batch), state.velocities, 0.0)
        keep, push, sys = fire_variables(sys, system_dot(f, v, batch), system_dot(f, f, batch),
                                         system_dot(v, v, batch), sys["started"])
        dt = sys["dt"]
        v = per_atom(keep, batch) * v + per_atom(push, batch) * f
        v = v + per_atom(unit_mass_kick(dt), batch) * f
        dr = per_atom(dt, batch) * v
        dr = dr * per_atom(step_scale(system_dot(dr, dr, batch), sys["max_step"]), batch)
        return state.replace(positions=state.positions + dr, velocities=v,
                             stage=state.stage.replace(system=sys))


# ----------------------------------------------------------------- FIRE2
@struct.dataclass(kw_only=True, eq=False)
class FIRE2(Dynamics):
    """FIRE 2.0 (Guénolé et al. 2020), per system, with unit masses.

    Each step, for each system: if ``P = F·v > 0``, count it and, after more than
    ``n_min`` downhill steps in a row, ``dt ← min(f_inc dt, dt_max)`` and
    ``α ← f_alpha α``. Otherwise reset the count, and — unless still within the
    first ``n_min`` steps when ``initial_delay`` — ``dt ← f_dec dt`` (only if that
    stays ≥ ``dt_min``) and ``α ← alpha_start``; then step back half a step,
    ``r ← r − ½ dt v``, and stop, ``v ← 0``. Then a semi-implicit Euler step with
    mixing after the velocity update: ``v += dt F``,
    ``v ← (1 − α) v + α |v| F/|F|``, ``r += dt v``, the displacement shrunk (over
    the whole system) to a norm of at most ``max_step`` as in :class:`FIRE`.

    Forces come from the current positions (one evaluation per step, as in the
    paper; ASE's FIRE2 re-evaluates them after the half-step correction). The
    paper's stop after ``N_P<0,max`` uphill steps is left to the convergence hook.

    dt, dt_max, dt_min: fs (defaults: ASE's FIRE2 0.1, 1.0, 0.002 time units).
    n_min: the delay N_delay (20). alpha_start 0.25, f_alpha 0.99, f_inc 1.1,
    f_dec 0.5. max_step: Å. All may be scalars or per system ``(S,)``.

    Example::

        relax = FIRE2(model, convergence=ConvergenceHook.from_fmax(0.01))
        result = relax.run(batch)
    """

    dt: float = ASE_DT
    max_step: float = 0.2
    dt_max: float = ASE_DT_MAX
    dt_min: float = ASE_DT_MIN
    n_min: int = 20
    f_inc: float = 1.1
    f_dec: float = 0.5
    alpha_start: float = 0.25
    f_alpha: float = 0.99
    initial_delay: bool = struct.field(pytree_node=False, default=True)

    conserves_momentum = False
    #: A fused stage entering this optimizer sets the velocities to zero.
    zero_velocities_on_entry = True

    def validate(self):
        name = type(self).__name__
        check_positive(name, dt=self.dt, dt_max=self.dt_max, dt_min=self.dt_min,
                       max_step=self.max_step)
        check_count(name, n_min=self.n_min)
        check_range(name, lo=1.0, f_inc=self.f_inc)
        check_range(name, lo=0.0, hi=1.0, lo_open=True, f_dec=self.f_dec, f_alpha=self.f_alpha)
        check_range(name, lo=0.0, hi=1.0, alpha_start=self.alpha_start)

    def init_stage(self, state, batch):
        return StageState(system={
            "dt": per_system(self.dt, batch), "dt_max": per_system(self.dt_max, batch),
            "dt_min": per_system(self.dt_min, batch), "max_step": per_system(self.max_step, batch),
            "n_min": per_system(self.n_min, batch, jnp.int32),
            "f_inc": per_system(self.f_inc, batch), "f_dec": per_system(self.f_dec, batch),
            "alpha_start": per_system(self.alpha_start, batch),
            "f_alpha": per_system(self.f_alpha, batch),
            "alpha": per_system(self.alpha_start, batch),
            "n_pos": jnp.zeros(batch.num_systems, jnp.int32),
            "iteration": jnp.zeros(batch.num_systems, jnp.int32),
        })

    def pre_update(self, state, batch):
        sys = state.stage.system
        f = state.forces
        v = jnp.where(atom_flag(sys["iteration"] > 0, batch), state.velocities, 0.0)
        downhill = system_dot(f, v, batch) > 0.0
        n_pos = jnp.where(downhill, sys["n_pos"] + 1, 0)
        grow = downhill & (n_pos > sys["n_min"])
        dt = jnp.where(grow, jnp.minimum(sys["dt"] * sys["f_inc"], sys["dt_max"]), sys["dt"])
        alpha = jnp.where(grow, sys["alpha"] * sys["f_alpha"], sys["alpha"])
        delayed = (sys["iteration"] + 1 < sys["n_min"]) if self.initial_delay \
            else jnp.zeros_like(downhill)
        reset = ~downhill & ~delayed
        shrunk = dt * sys["f_dec"]
        dt = jnp.where(reset & (shrunk >= sys["dt_min"]), shrunk, dt)
        alpha = jnp.where(reset, sys["alpha_start"], alpha)
        # Uphill: step back half a step with the (possibly reduced) dt, and stop.
        back = per_atom(jnp.where(downhill, 0.0, 0.5 * dt), batch)
        positions = state.positions - back * v
        v = jnp.where(atom_flag(downhill, batch), v, 0.0)
        # Semi-implicit Euler, then mixing with the updated velocity.
        v = v + per_atom(unit_mass_kick(dt), batch) * f
        f2, v2 = system_dot(f, f, batch), system_dot(v, v, batch)
        push = alpha * safe_sqrt(v2) / jnp.where(f2 > 0, safe_sqrt(f2), 1.0)
        v = per_atom(1.0 - alpha, batch) * v + per_atom(push, batch) * f
        dr = per_atom(dt, batch) * v
        dr = dr * per_atom(step_scale(system_dot(dr, dr, batch), sys["max_step"]), batch)
        sys = {**sys, "dt": dt, "alpha": alpha, "n_pos": n_pos, "iteration": sys["iteration"] + 1}
        return state.replace(positions=positions + dr, velocities=v,
                             stage=state.stage.replace(system=sys))
