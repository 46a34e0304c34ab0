"""The fused GPU pair kernel (Pallas) against the XLA form it replaces.

Run here in Pallas' interpreter (the same kernel body a GPU compiles through Triton):
the pair sums must agree with the XLA closed form to rounding. The XLA form itself is
checked against ASE and brute-force references in test_models.py (and
``NVALCHEMI_JAX_KERNELS=pallas pytest tests/test_models.py`` runs those against the
kernel too).
"""

from __future__ import annotations

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvalchemi_jax import _pallas, neighbors
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.models import LennardJones, Morse, compute, pair
from nvalchemi_jax.models import pair_kernel


def _crystals(seed=0):
    """Two argon crystals (one triclinic), a krypton-argon alloy, a slab, and a cell
    thinner than the cutoff (neighbors in several images per axis)."""
    rng = np.random.default_rng(seed)
    out = []
    for rep in ((3, 2, 2), (2, 2, 3)):
        a = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat(rep)
        out.append(a)
    tri = ase.build.bulk("Ar", "fcc", a=5.26).repeat((4, 4, 4))
    out[1] = tri
    kr = ase.build.bulk("Kr", "fcc", a=5.6, cubic=True).repeat((2, 2, 2))
    kr.numbers[::3] = 18
    out.append(kr)
    slab = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat((3, 3, 2))
    slab.pbc = (True, True, False)
    out.append(slab)
    out.append(ase.build.bulk("Ar", "fcc", a=5.26, cubic=True))   # thinner than the cutoff
    for a in out:
        a.positions += rng.normal(0, 0.1, a.positions.shape)
    return out


@pytest.fixture(scope="module")
def system():
    batch = Batch.from_atoms(_crystals())
    _, nl = neighbors.allocate(batch, 8.5, skin=0.5, method="cell_list")
    return batch, nl


@pytest.mark.parametrize("stress", [False, True])
def test_pair_sums_match_xla(system, stress):
    batch, nl = system
    lj = LennardJones.mixed(species=(18, 36), sigma=(3.4, 3.6), epsilon=(0.0104, 0.014),
                            cutoff=8.5, switch_on=8.0)
    table = pair.species_table(lj.species)
    ref = pair.pair_sums(lj.pair_term, lj.pair_parameters(), lj.cutoff, table,
                         batch.positions, batch.cell, batch, nl, stress)
    rows = jnp.asarray(table)[batch.atomic_numbers]
    got = pair_kernel.pair_sums(lj.pair_term, lj.cutoff, lj.pair_parameters(), rows, 2,
                                batch.positions, batch.cell, batch, nl, stress, interpret=True)
    assert len(got) == len(ref) == (10 if stress else 4)
    for a, b in zip(ref, got):
        scale = float(jnp.max(jnp.abs(a)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_compute_through_kernel_and_gradients(system, monkeypatch):
    """compute() with the kernel gives the XLA results, and derivatives through it (the
    custom JVP) equal those of the XLA form: forces w.r.t. a parameter and positions."""
    batch, nl = system
    model = lambda depth: Morse(depth=depth, alpha=1.2, r0=3.8, cutoff=8.5, switch_on=8.0)

    def loss(depth, positions):
        out = compute(model(depth), positions, batch.cell, batch, nl, stress=True)
        return jnp.sum(out.forces ** 2) + jnp.sum(out.stress) + jnp.sum(out.energy)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "xla")
    ref = compute(model(0.02), batch.positions, batch.cell, batch, nl, stress=True)
    ref_grad = grad(0.02, batch.positions)
    monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "pallas")
    assert _pallas.wanted(batch.num_atoms)
    got = compute(model(0.02), batch.positions, batch.cell, batch, nl, stress=True)
    jax.clear_caches()
    got_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.02, batch.positions)
    for f in ("energy", "forces", "stress"):
        a, b = np.asarray(getattr(ref, f)), np.asarray(getattr(got, f))
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * np.abs(a).max())
    for a, b in zip(ref_grad, got_grad):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "triton")
    with pytest.raises(ValueError, match="NVALCHEMI_JAX_KERNELS"):
        _pallas.mode()


@pytest.mark.parametrize("method", ["all_pairs", "cell_list"])
def test_pair_sums_from_packed_shifts(method):
    """The kernel reads one byte per neighbor for packed shift storage: the same sums as
    from int8 storage (and as the XLA form reading packed codes)."""
    import dataclasses
    rng = np.random.default_rng(4)
    wide = [ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat((4, 4, 4)),
            ase.build.bulk("Ar", "fcc", a=5.26).repeat((7, 7, 7)),       # triclinic
            ase.build.bulk("Kr", "fcc", a=5.6, cubic=True).repeat((4, 4, 2))]
    wide[2].pbc = (True, True, False)                                     # a slab
    for a in wide:
        a.positions += rng.normal(0, 0.1, a.positions.shape)
    batch = Batch.from_atoms(wide)        # cells wide enough for shifts within ±1
    spec, nl = neighbors.allocate(batch, 8.5, skin=0.5, method=method)
    packed = neighbors.build(dataclasses.replace(spec, shift_dtype="packed"), batch.positions,
                             batch.cell, batch)
    assert packed.shifts.dtype == jnp.uint8 and not bool(packed.overflow)
    assert_same_kernel_sums(batch, packed, nl)


def assert_same_kernel_sums(batch, table, reference):
    """The kernel's sums (with stress) from ``table`` equal those from ``reference`` bit for
    bit, and the XLA form's reading ``table``."""
    lj = LennardJones(sigma=3.4, epsilon=0.0104, cutoff=8.5, switch_on=8.0)
    args = (lj.pair_term, lj.cutoff, lj.pair_parameters(), None, 1, batch.positions, batch.cell, batch)
    ref = pair_kernel.pair_sums(*args, reference, True, interpret=True)
    got = pair_kernel.pair_sums(*args, table, True, interpret=True)
    xla = pair.pair_sums(lj.pair_term, lj.pair_parameters(), lj.cutoff, None, batch.positions,
                         batch.cell, batch, table, True)
    assert float(jnp.max(jnp.abs(ref[1]))) > 1e-3          # forces that could differ
    for a, b, c in zip(got, ref, xla):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def _mixed_lengths(method):
    """Two crystals and a cluster (rows of very different lengths in one batch), and its
    neighbor table snug and with 70 spare columns."""
    import dataclasses
    rng = np.random.default_rng(7)
    cluster = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    cluster.pbc = False
    cluster.cell = np.eye(3) * 30.0
    cluster.positions += rng.normal(0, 0.1, cluster.positions.shape)
    batch = Batch.from_atoms([*_crystals(1)[:2], cluster])
    spec, snug = neighbors.allocate(batch, 8.5, skin=0.5, method=method)
    wide = neighbors.build(dataclasses.replace(spec, max_neighbors=spec.max_neighbors + 70),
                           batch.positions, batch.cell, batch)
    return batch, snug, wide


@pytest.mark.parametrize("method", ["all_pairs", "cell_list"])
def test_rows_fill_from_the_front(method):
    """The pair kernel walks only the blocks of columns that some row of its tile uses,
    which relies on every row's entries coming before its padding, with spare columns too."""
    _, snug, wide = _mixed_lengths(method)
    for nl in (snug, wide):
        real = np.asarray(nl.mask)
        assert not bool(nl.overflow)
        assert np.all(real[:, 1:] <= real[:, :-1]), "a row has an entry after padding"
    lengths = np.asarray(snug.mask).sum(axis=1)
    assert lengths.min() < 0.6 * lengths.max()          # tiles of short and long rows
    k = snug.indices.shape[1]
    np.testing.assert_array_equal(np.asarray(wide.indices)[:, :k], np.asarray(snug.indices))


def test_spare_columns_are_skipped():
    """The sums from a table with 70 spare columns equal those from the snug one bit for
    bit (and the XLA form): a kernel that skipped a used block would miss pairs."""
    assert_same_kernel_sums(*_mixed_lengths("cell_list"))
