"""How to add an integrator: a Berendsen thermostat in ~30 lines.

A new integrator subclasses ``Dynamics`` and supplies only:

1. its numeric parameters as dataclass fields (pytree leaves: a new value never
   recompiles; a scalar or one value per system);
2. ``init_stage`` — its per-system (``system``, leading size S) and per-atom
   (``atom``, leading size N) variables, here just the parameters broadcast per system;
3. ``pre_update`` — the part of the step before forces are recomputed;
4. ``post_update`` — the part after.

The engine does the rest: forces before the first step, neighbor lists, masked
updates (only systems whose status is this stage's code move; fixed atoms never
move), hooks at nine phases, convergence and step budgets, per-system failure
on NaN, the compiled ``run`` loop.

Run: ``python examples/custom_integrator.py``
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import nvalchemi_jax as nj
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import Dynamics, StageState, maxwell_boltzmann, temperature
from nvalchemi_jax.dynamics.base import check_positive, per_system
from nvalchemi_jax.dynamics.integrators.nve import drift, half_kick


@struct.dataclass(kw_only=True, eq=False)
class Berendsen(Dynamics):
    """Velocity Verlet with Berendsen velocity rescaling towards ``temperature`` (K)
    with time constant ``tau`` (fs). Not canonical — an equilibration tool."""

    dt: float = 2.0
    temperature: float = 300.0
    tau: float = 100.0

    def validate(self):
        check_positive("Berendsen", dt=self.dt, temperature=self.temperature, tau=self.tau)

    def init_stage(self, state, batch):
        return StageState(system={"dt": per_system(self.dt, batch),
                                  "temperature": per_system(self.temperature, batch),
                                  "tau": per_system(self.tau, batch)})

    def pre_update(self, state, batch):
        dt = state.stage.system["dt"]
        return drift(half_kick(state, batch, dt), batch, dt)

    def post_update(self, state, batch):
        p = state.stage.system
        state = half_kick(state, batch, p["dt"])
        current = temperature(state.velocities, batch)
        scale = jnp.sqrt(1.0 + p["dt"] / p["tau"] * (p["temperature"] / jnp.maximum(current, 1e-12) - 1.0))
        return state.replace(velocities=state.velocities * gather_systems(scale, batch.system_index)[:, None])


def main():
    positions, cell = fcc_crystal((3, 3, 3))
    rng = np.random.default_rng(0)
    batch = nj.Batch.from_arrays(positions=[positions + rng.normal(0, 0.02, positions.shape)] * 2,
                                 atomic_numbers=[np.full(len(positions), 18)] * 2,
                                 cell=[cell] * 2, pbc=[True, True])
    batch = batch.replace(velocities=maxwell_boltzmann(batch, 10.0, jax.random.key(0)))
    model = nj.models.LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    # Two systems, two target temperatures: per-system parameters.
    md = Berendsen(model=model, dt=5.0, temperature=np.array([30.0, 60.0]), tau=100.0, n_steps=1000)
    result = md.run(batch, chunk_size=500)
    t = np.asarray(temperature(result.state.velocities, batch))
    print(f"final temperatures: {t[0]:.1f} K (target 30), {t[1]:.1f} K (target 60)")
    return t


if __name__ == "__main__":
    main()
