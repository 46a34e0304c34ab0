"""FlaxModel: a flax module as a potential, with forces and stress by autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvalchemi_jax as nj
from nvalchemi_jax.datasets import fcc_cluster, fcc_crystal
from nvalchemi_jax.models import AtomGraph, FlaxModel, LennardJones, compute


class PairLJ(nn.Module):
    """Lennard-Jones written as a flax module with learnable σ and ε."""

    @nn.compact
    def __call__(self, graph: AtomGraph):
        sigma = self.param("sigma", lambda key: jnp.asarray(3.4))
        epsilon = self.param("epsilon", lambda key: jnp.asarray(0.0104))
        r2 = jnp.sum(graph.vectors**2, axis=-1)
        s6 = (sigma**2 / r2) ** 3
        return 0.5 * jnp.sum(jnp.where(graph.neighbor_mask, 4 * epsilon * (s6**2 - s6), 0.0), axis=1)


class TinyMLP(nn.Module):
    """A small learned pair potential with a smooth cutoff and species embedding."""

    cutoff: float

    @nn.compact
    def __call__(self, graph: AtomGraph):
        r = jnp.linalg.norm(graph.vectors, axis=-1, keepdims=True)
        z = nn.Embed(119, 4)(graph.atomic_numbers)[:, None, :]
        h = jnp.concatenate([r / self.cutoff, jnp.broadcast_to(z, r.shape[:2] + (4,))], axis=-1)
        h = nn.Dense(1)(nn.tanh(nn.Dense(16)(h)))[..., 0]
        envelope = jnp.cos(0.5 * jnp.pi * jnp.minimum(r[..., 0] / self.cutoff, 1.0)) ** 2
        return jnp.sum(jnp.where(graph.neighbor_mask, h * envelope, 0.0), axis=1)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    crystal, cell = fcc_crystal((3, 3, 3))
    cluster = fcc_cluster(19)
    positions = [crystal + rng.normal(0, 0.05, crystal.shape), cluster + rng.normal(0, 0.05, cluster.shape)]
    return nj.Batch.from_arrays(positions=positions, atomic_numbers=[np.full(108, 18), np.full(19, 18)],
                                cell=[cell, np.zeros((3, 3))], pbc=[True, False])


def init_model(module, batch, nl, cutoff):
    graph = FlaxModel(variables={}, module=module, cutoff=cutoff).graph(
        batch.positions, batch.cell, batch, nl)
    return FlaxModel(variables=module.init(jax.random.key(0), graph), module=module, cutoff=cutoff)


def test_flax_lj_equals_builtin_lj(x64):
    batch = make_batch()
    _, nl = nj.neighbors.allocate(batch, cutoff=8.5)
    flax_model = init_model(PairLJ(), batch, nl, 8.5)
    ours = compute(flax_model, batch.positions, batch.cell, batch, nl, stress=True)
    ref = compute(LennardJones(sigma=3.4, epsilon=0.0104, cutoff=8.5), batch.positions,
                  batch.cell, batch, nl, stress=True)
    np.testing.assert_allclose(ours.energy, ref.energy, rtol=1e-12)
    np.testing.assert_allclose(ours.forces, ref.forces, atol=1e-12)
    np.testing.assert_allclose(ours.stress, ref.stress, atol=1e-14)


def test_mlp_forces_are_minus_gradient(x64):
    batch = make_batch()
    _, nl = nj.neighbors.allocate(batch, cutoff=5.0, skin=1.0)
    model = init_model(TinyMLP(cutoff=5.0), batch, nl, 5.0)
    out = compute(model, batch.positions, batch.cell, batch, nl)
    energy = lambda p: jnp.sum(model.energy(p, batch.cell, batch, nl))
    h = 1e-5
    for atom in (0, 50, 110):
        for axis in range(3):
            dp = jnp.zeros_like(batch.positions).at[atom, axis].set(h)
            fd = -(energy(batch.positions + dp) - energy(batch.positions - dp)) / (2 * h)
            assert float(out.forces[atom, axis]) == pytest.approx(float(fd), abs=1e-7)
    # Padding atoms carry no energy and no force.
    assert np.all(np.asarray(out.forces)[~np.asarray(batch.atom_mask)] == 0)


def test_new_weights_do_not_recompile():
    batch = make_batch()
    _, nl = nj.neighbors.allocate(batch, cutoff=5.0)
    model = init_model(TinyMLP(cutoff=5.0), batch, nl, 5.0)
    traces = []

    @jax.jit
    def energy(model, positions):
        traces.append(1)
        return compute(model, positions, batch.cell, batch, nl).energy

    e1 = energy(model, batch.positions)
    perturbed = model.replace(variables=jax.tree.map(lambda w: w * 1.1, model.variables))
    e2 = energy(perturbed, batch.positions + 0.01)
    assert len(traces) == 1
    assert not np.allclose(e1, e2)
