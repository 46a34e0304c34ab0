"""Inflight relaxation over a list of ASE ``Atoms``: a fixed-capacity batch whose finished
slots are refilled from the dataset without recompiling; results go to host memory
(any sink works) and come back as ASE ``Atoms``.

Run: ``python examples/inflight_ase_dataset.py [--structures 40]``
"""

import argparse

import numpy as np
from ase.build import bulk

import nvalchemi_jax as nj
from nvalchemi_jax.dynamics import FIRE, ConvergenceHook, HostMemory, SizeAwareSampler


def dataset(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    structures = []
    for i in range(count):
        n = (2, 2, int(rng.integers(2, 4)))
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * n
        atoms.rattle(0.1, seed=seed + i)
        structures.append(atoms)
    return structures


def main(structures: int = 40):
    data = dataset(structures)
    model = nj.models.LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=8.0)
    relax = FIRE(model, convergence=ConvergenceHook.from_fmax(0.05))
    sink = HostMemory()
    sampler = SizeAwareSampler(data, nj.Capacity(num_systems=8, num_atoms=512))   # a list of Atoms works as is
    result = relax.run(sampler=sampler, sinks=[sink], refill_frequency=10)
    relaxed = sink.read().to_atoms()                                             # back to ASE, with results
    fmax = max(np.abs(a.get_forces()).max() for a in relaxed)
    print(f"relaxed {result.written} structures in {result.steps} steps ({result.refills} refills, "
          f"slot occupancy {result.occupancy:.2f}); largest force component {fmax:.3f} eV/Å")
    return relaxed


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--structures", type=int, default=40)
    main(p.parse_args().structures)
