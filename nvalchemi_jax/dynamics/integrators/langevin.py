"""NVT Langevin dynamics with the BAOAB splitting (Leimkuhler–Matthews).

One step of length ``dt`` is

* B: ``v += ½ dt F/m``;
* A: ``r += ½ dt v``;
* O: ``v = c₁ v + sqrt((1 − c₁²) kT/m) ξ`` with ``c₁ = exp(−γ dt)`` — the exact
  solution of the Ornstein–Uhlenbeck process over ``dt``;
* A: ``r += ½ dt v``;
* compute forces;
* B: ``v += ½ dt F/m``.

BAOAB samples configurations with an error of O(dt²) that is unusually small
in practice, and reduces to velocity Verlet when ``friction = 0``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from nvalchemi_jax import units
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics import thermo
from nvalchemi_jax.dynamics.base import (Dynamics, StageState, check_non_negative, check_positive,
                                         per_system)
from nvalchemi_jax.dynamics.integrators.nve import half_kick

#: Stream of the O-step noise in :func:`thermo.atom_normal` (distinct from other uses).
NOISE_SALT = 0x4C414E47


def ornstein_uhlenbeck(state, batch, dt, temperature, friction):
    """The O step: exact Ornstein–Uhlenbeck update of the velocities over ``dt (S,)`` fs.

    temperature: ``(S,)`` K; friction: ``(S,)`` 1/fs. The noise depends only on
    (key, sample id, the system's step, atom index), so a system's trajectory
    does not depend on its slot or its batch mates.
    """
    index = batch.system_index
    c1 = jnp.exp(-gather_systems(friction * dt, index))
    kt = units.KB * gather_systems(temperature, index)
    # Per-component velocity variance at kT is kT/m in eV/amu; / MV2_TO_EV gives Å²/fs².
    sigma = jnp.sqrt(jnp.maximum(1.0 - c1 * c1, 0.0) * kt / (batch.masses * units.MV2_TO_EV))
    noise = thermo.atom_normal(state.key, batch, state.step, salt=NOISE_SALT,
                               dtype=state.velocities.dtype)
    velocities = c1[:, None] * state.velocities + sigma[:, None] * noise
    return state.replace(velocities=jnp.where(batch.atom_mask[:, None], velocities, 0.0))


def _half_drift(state, batch, dt):
    return state.replace(positions=state.positions
                         + 0.5 * gather_systems(dt, batch.system_index)[:, None] * state.velocities)


@struct.dataclass(kw_only=True, eq=False)
class NVTLangevin(Dynamics):
    """Canonical (NVT) molecular dynamics with a Langevin thermostat, BAOAB splitting.

    dt: time step, fs. temperature: target temperature, K (>= 0).
    friction: γ, 1/fs (>= 0; 0 is NVE; ``1/friction`` is the velocity relaxation time).
    Each may be a scalar or a per-system ``(S,)`` array; they are copied into
    ``state.stage.system`` (``dt``, ``temperature``, ``friction``, each ``(S,)``),
    so changing them there never recompiles.

    The random force does not conserve the total momentum: the kinetic
    temperature of a Langevin system uses ``3 N`` degrees of freedom
    (``thermo.temperature(v, batch, remove_com=False)``).

    Example::

        md = NVTLangevin(model=lj, dt=5.0, temperature=50.0, friction=0.01, n_steps=1000)
        state = md.init(batch, jax.random.key(0))
        state = jax.jit(md.step)(state, batch)
    """

    dt: float = 1.0
    temperature: float
    friction: float = 0.01

    conserves_momentum = False

    def validate(self):
        check_positive("NVTLangevin", dt=self.dt)
        check_non_negative("NVTLangevin", temperature=self.temperature, friction=self.friction)

    def init_stage(self, state, batch):
        return StageState(system={"dt": per_system(self.dt, batch),
                                  "temperature": per_system(self.temperature, batch),
                                  "friction": per_system(self.friction, batch)})

    def pre_update(self, state, batch):
        p = state.stage.system
        dt = p["dt"]
        state = _half_drift(half_kick(state, batch, dt), batch, dt)
        state = ornstein_uhlenbeck(state, batch, dt, p["temperature"], p["friction"])
        return _half_drift(state, batch, dt)

    def post_update(self, state, batch):
        return half_kick(state, batch, state.stage.system["dt"])
