"""Resident NVE (many steps of small periodic systems in one kernel program each): against
ASE's VelocityVerlet, against the step-by-step engine on mixed batches, failure
isolation, and which runs qualify. Off a GPU the kernel runs in Pallas' interpreter
(``NVALCHEMI_JAX_KERNELS=pallas``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvalchemi_jax.dynamics import NVE, ConvergenceHook, Criterion, NVTLangevin, resident
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.hooks import LoggingHook
from nvalchemi_jax.models import LennardJones

import _helpers
from _helpers import ARGON, argon_batch, ase_velocity_verlet, assert_matches_ase, assert_same_states, mixed_batch

SHORT = dict(sigma=3.40, epsilon=0.0104, cutoff=5.0)   # (2, 2, 2) argon cells are 10.5 Å wide


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "pallas")
    monkeypatch.delenv("NVALCHEMI_JAX_RESIDENT", raising=False)
    monkeypatch.setenv("NVALCHEMI_JAX_LEAPFROG", "0")      # the engine when not resident
    return monkeypatch


def run_both(kernels, md, batch, state=None, **kwargs):
    """The same run resident and step by step."""
    return _helpers.run_both(kernels, "NVALCHEMI_JAX_RESIDENT", md, batch, state, **kwargs)


def test_matches_ase_velocity_verlet(x64, kernels):
    """256 argon atoms (a 21 Å cell, cutoff 8.5 Å), 60 steps of 5 fs in one kernel call per
    chunk: positions agree with ASE driving its own LJ to 1e-6 Å."""
    batch = argon_batch(repeats=[(4, 4, 4)], temperature=40.0)
    md = NVE(model=LennardJones(**ARGON, shift=True), dt=5.0, n_steps=60)
    assert resident.plan(md, batch) == 256
    ours = md.run(batch, chunk_size=40).state
    atoms = ase_velocity_verlet(batch, 60, sigma=ARGON["sigma"], epsilon=ARGON["epsilon"],
                                rc=ARGON["cutoff"], smooth=False)
    assert_matches_ase(ours, atoms)


def test_matches_engine_on_a_mixed_batch(x64, kernels):
    """Sizes 32 / 48 / 108 (padded to 128), two species from tables, a fixed atom, ASE's
    smooth cutoff, and a step budget (25) that ends inside a chunk: every field of the
    state equals the step-by-step engine's (itself checked against ASE in test_nve)."""
    batch = mixed_batch()
    model = LennardJones.mixed(species=(18, 36), sigma=(3.40, 3.65), epsilon=(0.0104, 0.0140),
                               cutoff=5.0, switch_on=4.5)
    md = NVE(model=model, dt=4.0, n_steps=25)
    assert resident.plan(md, batch) == 128
    fast, slow = run_both(kernels, md, batch, chunk_size=10)
    assert_same_states(fast.state, slow.state, rebuilds=False)     # (resident runs keep no list)
    assert fast.steps == slow.steps == 25 and fast.converged[:3].all()
    pinned = np.flatnonzero(np.asarray(batch.fixed))
    np.testing.assert_array_equal(np.asarray(fast.state.positions)[pinned],
                                  np.asarray(batch.positions)[pinned])


@pytest.mark.parametrize("whole", [False, True], ids=["walked", "one-block"])
def test_split_kernel_matches_engine(x64, kernels, whole):
    """The kernel that splits a system over several programs (for few systems on a GPU),
    with one part, as Pallas' interpreter runs it (its barrier needs the programs to run
    at once; the GPU check is benchmarks/check_kernels.py): the same states as the engine,
    with the program's partners walked a block at a time and taken in one block."""
    kernels.setenv("NVALCHEMI_JAX_RESIDENT_PARTS", "1")
    kernels.setattr(resident, "WHOLE_TILE", 1 << 20 if whole else 0)
    jax.clear_caches()          # the chunk's program reads WHOLE_TILE when it is traced
    batch = mixed_batch()
    model = LennardJones(**SHORT, shift=True, species=None)
    batch = batch.replace(atomic_numbers=jnp.where(batch.atom_mask, 18, batch.atomic_numbers))
    md = NVE(model=model, dt=4.0, n_steps=9)
    fast, slow = run_both(kernels, md, batch, chunk_size=4)
    assert_same_states(fast.state, slow.state, rebuilds=False)
    assert fast.steps == slow.steps == 9


def test_parts_per_system(monkeypatch):
    """As many programs per system as keep the whole grid on an H200's 132 multiprocessors
    at once (two per multiprocessor), with at least one row each (0: one program per
    system, the unsplit kernel);
    never off GPUs; the override is checked."""
    monkeypatch.delenv("NVALCHEMI_JAX_RESIDENT_PARTS", raising=False)
    monkeypatch.setattr(resident._pallas, "multiprocessors", lambda: 132)
    assert [resident.parts_for(b, 256) for b in (1, 4, 64, 66, 67, 132, 133)] == [256, 64, 4, 4, 2, 2, 0]
    assert resident.parts_for(1, 32) == 32
    monkeypatch.setattr(resident._pallas, "multiprocessors", lambda: 0)
    assert resident.parts_for(1, 256) == 0
    monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT_PARTS", "1")
    assert resident.parts_for(1, 256) == 1
    for bad in ("3", "512", "-2"):
        monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT_PARTS", bad)
        with pytest.raises(ValueError, match="power of two"):
            resident.parts_for(1, 256)
    monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT_PARTS", "4")
    if not resident._pallas.on_gpu():
        with pytest.raises(ValueError, match="needs a GPU"):
            resident.parts_for(1, 256)


def test_split_program_shapes():
    """Rows, partners per block and warps of a split program: one block up to 2,048 pairs,
    then 32 partners at a time (16 beyond 16 rows); two warps for blocks up to 256 pairs;
    a warp count whose programs may not fit two to a multiprocessor is refused."""
    shapes = {(w, p): resident.split_shape(w, p) for w, p in [(256, 256), (256, 64), (256, 8), (256, 4),
                                                               (256, 1), (32, 32)]}
    assert shapes == {(256, 256): (1, 256, 2), (256, 64): (4, 256, 4), (256, 8): (32, 16, 4),
                      (256, 4): (64, 16, 4), (256, 1): (256, 16, 4), (32, 32): (1, 32, 2)}
    assert resident.split_shape(512, 32) == (16, 32, 4)       # 8,192 pairs: walked, 32 at a time


def test_split_programs_must_fit_together(monkeypatch):
    monkeypatch.setattr(resident, "SPLIT_WARPS", 8)
    with pytest.raises(ValueError, match="may not fit"):
        resident.split_shape(256, 64)


def test_a_failing_system_leaves_the_others(x64, kernels):
    """A non-finite velocity in system 1 fails it (named reason, reset to the chunk's start);
    systems 0 and 2 run on exactly as the engine runs them."""
    batch = mixed_batch()
    model = LennardJones(**SHORT, shift=True, species=None)
    md = NVE(model=model, dt=4.0, n_steps=12)
    batch = batch.replace(atomic_numbers=jnp.where(batch.atom_mask, 18, batch.atomic_numbers))
    state = md.init(batch)
    bad = int(np.flatnonzero(np.asarray(batch.system_index) == 1)[5])
    state = state.replace(velocities=state.velocities.at[bad, 0].set(jnp.nan))
    fast, slow = run_both(kernels, md, batch, state=state, chunk_size=12)
    assert fast.failed[:3].tolist() == [False, True, False] == slow.failed[:3].tolist()
    assert "non-finite" in fast.failures[1]
    # A NaN velocity makes the position, then the forces, NaN; forces are named first.
    assert int(fast.state.failure[1]) == int(status_codes.Failure.NONFINITE_FORCES)
    assert int(slow.state.failure[1]) == int(status_codes.Failure.NONFINITE_FORCES)
    keep = np.asarray(batch.system_index) != 1
    keep &= np.asarray(batch.atom_mask)
    np.testing.assert_allclose(np.asarray(fast.state.positions)[keep],
                               np.asarray(slow.state.positions)[keep], rtol=1e-9, atol=1e-12)
    assert fast.converged[[0, 2]].all()


def test_which_runs_qualify(kernels):
    batch = argon_batch(repeats=[(2, 2, 2), (3, 3, 3)])
    model = LennardJones(**SHORT, shift=True)
    assert resident.plan(NVE(model=model, dt=2.0, n_steps=10), batch) == 128
    assert resident.plan(NVE(model=model, dt=2.0), batch) == 128           # no budget
    budget = ConvergenceHook((Criterion("step", 10),))
    assert resident.plan(NVE(model=model, dt=2.0, convergence=budget), batch) == 128
    fmax = ConvergenceHook((Criterion("fmax", 0.1),))
    refused = [
        NVE(model=model, dt=2.0, convergence=fmax),                             # not a budget
        NVE(model=model, dt=2.0, n_steps=10, hooks=(LoggingHook(frequency=5),)),  # hooks
        NVTLangevin(model=model, dt=2.0, temperature=50.0, friction=0.01, n_steps=10),
        NVE(model=LennardJones(**ARGON, shift=True), dt=2.0, n_steps=10),      # cells < 2 cutoffs
    ]
    for md in refused:
        assert resident.plan(md, batch) == 0, md
    md = NVE(model=model, dt=2.0, n_steps=10)
    assert resident.plan(md, argon_batch(repeats=[(2, 2, 2), (4, 4, 4), (4, 4, 5)])) == 0  # 320 atoms
    open_batch = batch.replace(pbc=batch.pbc.at[1, 2].set(False))
    assert resident.plan(md, open_batch) == 0
    kernels.setenv("NVALCHEMI_JAX_RESIDENT", "0")
    assert resident.plan(md, batch) == 0
    kernels.setenv("NVALCHEMI_JAX_RESIDENT", "1")
    kernels.setenv("NVALCHEMI_JAX_KERNELS", "auto")     # auto: the kernels only on a GPU
    assert resident.plan(md, batch) == (128 if resident._pallas.on_gpu() else 0)


def test_atom_table_lists_each_systems_atoms_in_order_after_refills():
    """Refills put a system's atoms in whatever slots are free, so a system's atoms need not
    be contiguous; padding atoms (index S) and empty system slots stay out of the table."""
    from nvalchemi_jax import Capacity
    batch = argon_batch(repeats=[(1, 1, 1), (1, 1, 2), (1, 1, 1)], capacity=Capacity(4, 24, 32))
    # Interleaved systems, padding atoms between them, system slot 3 empty.
    index = np.array([2, 0, 1, 4, 1, 0, 2, 1, 4, 0, 1, 2, 1, 0, 1, 4, 1, 2, 1, 4, 4, 4, 4, 4], np.int32)
    table = np.asarray(resident.atom_table(batch.replace(system_index=jnp.asarray(index)), 12))
    n = batch.num_atoms
    for s in range(4):
        atoms = np.flatnonzero(index == s)
        np.testing.assert_array_equal(table[s, :len(atoms)], atoms)
        assert (table[s, len(atoms):] == n).all()
