"""Wrap a flax module (a machine-learned potential) as a model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from nvalchemi_jax.models.base import Composable
from nvalchemi_jax.neighbors import pair_vectors
from nvalchemi_jax import segments


@struct.dataclass
class AtomGraph:
    """What a flax potential sees: neighbor pairs within the model's cutoff.

    vectors: ``(N, K, 3)`` Å pair vectors r_j − r_i (images included).
    neighbor_mask: ``(N, K) bool`` real pairs within the cutoff.
    neighbor_indices: ``(N, K) int32`` j (padding = N).
    atomic_numbers, atom_mask, system_index: ``(N,)`` from the batch.
    num_systems: static ``S``.
    """

    vectors: jax.Array
    neighbor_mask: jax.Array
    neighbor_indices: jax.Array
    atomic_numbers: jax.Array
    atom_mask: jax.Array
    system_index: jax.Array
    num_systems: int = struct.field(pytree_node=False)


@struct.dataclass
class FlaxModel(Composable):
    """A flax module ``module.apply(variables, graph: AtomGraph) -> (N,)`` per-atom energies (eV).

    Energies of padding atoms are dropped and the rest summed per system;
    forces and stress follow by autodiff through ``graph.vectors`` like any model.
    The variables are a pytree leaf: new weights never recompile.

    Example::

        module = MyPotential()
        variables = module.init(key, example_graph)
        model = FlaxModel(variables=variables, module=module, cutoff=5.0)
    """

    variables: Any
    module: Any = struct.field(pytree_node=False)
    cutoff: float = struct.field(pytree_node=False)

    def graph(self, positions, cell, batch, neighbors) -> AtomGraph:
        d, mask = pair_vectors(neighbors, positions, cell, batch)
        within = mask & (jnp.sum(d * d, axis=-1) < self.cutoff**2)
        # Masked pairs get a harmless finite vector so norms and their gradients stay finite.
        d = jnp.where(within[..., None], d, jnp.asarray(2.0 * self.cutoff, d.dtype))
        return AtomGraph(vectors=d, neighbor_mask=within, neighbor_indices=neighbors.indices,
                         atomic_numbers=batch.atomic_numbers, atom_mask=batch.atom_mask,
                         system_index=batch.system_index, num_systems=batch.num_systems)

    def energy(self, positions, cell, batch, neighbors):
        per_atom = self.module.apply(self.variables, self.graph(positions, cell, batch, neighbors))
        per_atom = jnp.reshape(per_atom, (positions.shape[0],))
        per_atom = jnp.where(batch.atom_mask, per_atom, 0.0)
        return segments.segment_sum(per_atom, batch.system_index, batch.num_systems)
