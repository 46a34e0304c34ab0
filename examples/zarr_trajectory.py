"""Write an MD trajectory to a zarr store with a SnapshotHook, then read it back three ways:
as Frames (numpy, no loop over frames), as ASE Atoms, and with plain zarr.

Run: ``python examples/zarr_trajectory.py [--path trajectory.zarr]``
"""

import argparse
import tempfile

import jax
import numpy as np
import zarr

import nvalchemi_jax as nj
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import NVE, ZarrData, maxwell_boltzmann
from nvalchemi_jax.dynamics.hooks import SnapshotHook
from nvalchemi_jax.dynamics.sinks import read_zarr


def main(path: str | None = None, steps: int = 100):
    path = path or tempfile.mkdtemp() + "/trajectory.zarr"
    positions, cell = fcc_crystal((2, 2, 2))
    batch = nj.Batch.from_arrays(positions=[positions, positions + 0.05], atomic_numbers=[np.full(32, 18)] * 2,
                                 cell=[cell] * 2, pbc=[True, True])
    batch = batch.replace(velocities=maxwell_boltzmann(batch, 40.0, jax.random.key(0)))
    model = nj.models.LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=8.0)
    with ZarrData(path) as sink:
        NVE(model, dt=5.0, n_steps=steps, hooks=[SnapshotHook(sink=sink, frequency=10)]).run(batch)
    frames = read_zarr(path)                            # ragged arrays + offsets
    atoms = frames.to_atoms()                           # ASE, energies and forces attached
    group = zarr.open_group(path, mode="r")             # plain zarr: no library needed
    offsets = group["offsets"][:]
    first = group["positions"][offsets[0]:offsets[1]]
    print(f"{len(frames)} frames of samples {sorted(set(frames.sample_id.tolist()))}, steps "
          f"{sorted(set(frames.step.tolist()))[:3]}...; first frame {first.shape}, "
          f"E = {atoms[0].get_potential_energy():.4f} eV; store at {path}")
    return frames


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--path", default=None)
    main(p.parse_args().path)
