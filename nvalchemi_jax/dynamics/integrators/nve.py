"""NVE: velocity Verlet."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from nvalchemi_jax import units
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics.base import Dynamics, StageState, check_positive, per_system


def half_kick(state, batch, dt):
    """v += ½ dt F/m for ``dt (S,)`` fs."""
    a = state.forces / batch.masses[:, None] * units.FORCE_TO_ACCELERATION
    return state.replace(velocities=state.velocities
                         + 0.5 * gather_systems(dt, batch.system_index)[:, None] * a)


def drift(state, batch, dt):
    """r += dt v for ``dt (S,)`` fs."""
    return state.replace(positions=state.positions
                         + gather_systems(dt, batch.system_index)[:, None] * state.velocities)


@struct.dataclass(kw_only=True, eq=False)
class NVE(Dynamics):
    """Microcanonical molecular dynamics with velocity Verlet.

    dt: fs, scalar or per system ``(S,)``.

    Example::

        md = NVE(model, dt=5.0, n_steps=1000)
        result = md.run(batch)
    """

    dt: float = 1.0

    def validate(self):
        check_positive("NVE", dt=self.dt)

    def init_stage(self, state, batch):
        return StageState(system={"dt": per_system(self.dt, batch)})

    def pre_update(self, state, batch):
        dt = state.stage.system["dt"]
        return drift(half_kick(state, batch, dt), batch, dt)

    def post_update(self, state, batch):
        return half_kick(state, batch, state.stage.system["dt"])
