"""Relax → MD fused in one batch: FIRE to fmax 0.05 eV/Å, then NVT Langevin at 60 K.

``relax + md`` is a FusedStage: one model evaluation per step for all systems;
each system moves from FIRE to MD the step after it converges, with fresh
thermostat variables and Maxwell–Boltzmann velocities at 60 K.

Run: ``python examples/relax_then_md.py [--systems 8]``
"""

import argparse

import jax
import numpy as np

import nvalchemi_jax as nj
from nvalchemi_jax.datasets import argon_systems
from nvalchemi_jax.dynamics import FIRE, ConvergenceHook, NVTLangevin, temperature


def main(systems: int = 8, md_steps: int = 100):
    data = argon_systems(systems, seed=1, min_atoms=32, max_atoms=108)
    batch = nj.Batch.from_arrays(**data)
    model = nj.models.LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=8.0)
    relax = FIRE(model, convergence=ConvergenceHook.from_fmax(0.05))
    md = NVTLangevin(model, dt=5.0, temperature=60.0, friction=0.01, n_steps=md_steps)
    result = (relax + md).run(batch, key=jax.random.key(0), max_steps=5000, chunk_size=100)
    t = np.asarray(temperature(result.state.velocities, batch, remove_com=False))
    filled = np.asarray(batch.system_mask)
    print(f"{int(result.converged.sum())}/{int(filled.sum())} systems relaxed and ran {md_steps} MD steps "
          f"in {result.steps} steps; mean final temperature {t[filled].mean():.1f} K")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--md-steps", type=int, default=100)
    a = p.parse_args()
    main(a.systems, a.md_steps)
