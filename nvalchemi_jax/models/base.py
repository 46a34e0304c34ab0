"""The model contract, and forces and stress derived from energies by autodiff.

A model is a pytree (its parameters are leaves, so changing them never
recompiles) with

* ``cutoff: float`` — a static attribute, the interaction range in Å;
* ``energy(positions, cell, batch, neighbors) -> (S,)`` — per-system energy in eV,
  pure and differentiable in ``positions (N, 3)`` Å and ``cell (S, 3, 3)`` Å.

:func:`compute` turns any such model into energies, forces ``-dE/dr`` (eV/Å)
and the stress ``(1/V) dE/dε`` (eV/Å³, tensile positive, ASE's sign) from one
reverse-mode pass. A model may also offer the same quantities in closed form,

* ``evaluate(positions, cell, batch, neighbors, forces, stress) -> ModelOutput``,

which :func:`compute` then uses (pair potentials do: a gather over the full
neighbor list is much faster on a GPU than autodiff's scatter of pair gradients).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct

from nvalchemi_jax._linalg import det3, matmul3, vecmat
from nvalchemi_jax.batch import Batch, gather_systems
from nvalchemi_jax.neighbors import NeighborList


class Composable:
    """Mixin giving models ``a + b`` (a :class:`~nvalchemi_jax.models.sum.SumModel`)."""

    def __add__(self, other):
        from nvalchemi_jax.models.sum import add
        return add(self, other)


class Model(Protocol):
    cutoff: float

    def energy(self, positions: jax.Array, cell: jax.Array, batch: Batch,
               neighbors: NeighborList) -> jax.Array: ...


@struct.dataclass
class ModelOutput:
    """Per-system ``energy (S,)`` eV; ``forces (N, 3)`` eV/Å and ``stress (S, 3, 3)``
    eV/Å³ when asked for (else ``None``). Empty slots and padding atoms hold zeros."""

    energy: jax.Array
    forces: jax.Array | None = None
    stress: jax.Array | None = None


def volume(cell: jax.Array) -> jax.Array:
    """``(S,)`` cell volumes |det(cell)| in Å³."""
    return jnp.abs(det3(cell))


def compute(model: Model, positions: jax.Array, cell: jax.Array, batch: Batch,
            neighbors: NeighborList, forces: bool = True, stress: bool = False,
            method: str = "auto") -> ModelOutput:
    """Evaluate ``model`` on a batch: energies, and forces/stress.

    ``method="auto"`` uses the model's closed-form ``evaluate`` when it has one,
    else autodiff; ``"autodiff"`` always differentiates ``model.energy``.

    The stress is the derivative with respect to a homogeneous strain ε applied
    to positions and cell (``r -> r (1 + ε)``), divided by the volume; systems
    with a singular cell (clusters) get zero stress.

    Example::

        out = compute(model, batch.positions, batch.cell, batch, nl, stress=True)
        out.energy  # (S,)
    """
    if method not in ("auto", "autodiff"):
        raise ValueError(f"compute: method must be 'auto' or 'autodiff', got {method!r}")
    if method == "auto" and hasattr(model, "evaluate"):
        return model.evaluate(positions, cell, batch, neighbors, forces=forces, stress=stress)
    if not (forces or stress):
        return ModelOutput(energy=model.energy(positions, cell, batch, neighbors))

    def total(positions, strain):
        deform = jnp.eye(3, dtype=cell.dtype) + strain
        strained = positions + vecmat(positions, gather_systems(strain, batch.system_index))
        energy = model.energy(strained, matmul3(cell, deform), batch, neighbors)
        return jnp.sum(energy), energy

    strain = jnp.zeros_like(cell)
    (_, energy), (d_positions, d_strain) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(positions, strain)
    out_forces = -d_positions if forces else None
    out_stress = None
    if stress:
        vol = volume(cell)
        safe = jnp.where(vol > 0, vol, 1.0)
        out_stress = jnp.where((vol > 0)[:, None, None], d_strain / safe[:, None, None], 0.0)
    return ModelOutput(energy=energy, forces=out_forces, stress=out_stress)
