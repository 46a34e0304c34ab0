"""Hooks that change the state inside the compiled step (pure, no host work)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax._linalg import inv3, vecmat
from nvalchemi_jax.neighbors import binning_frame
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics.hooks.base import Hook, Stage
from nvalchemi_jax import segments


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class MaxForceClampHook(Hook):
    """Scale down any per-atom force longer than ``max_force`` eV/Å (after every compute).
    Useful to survive the first steps from overlapping atoms; it changes the dynamics."""

    max_force: float = 10.0
    stages: tuple = (Stage.AFTER_COMPUTE,)

    def __post_init__(self):
        if not self.max_force > 0:
            raise ValueError(f"MaxForceClampHook.max_force must be > 0, got {self.max_force}")
        object.__setattr__(self, "fn", self._clamp)
        super().__post_init__()

    def _clamp(self, state, batch, ctx):
        norm = jnp.linalg.norm(state.forces, axis=-1, keepdims=True)
        scale = jnp.minimum(1.0, self.max_force / jnp.maximum(norm, 1e-30))
        return state.replace(forces=state.forces * scale)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class FreezeAtomsHook(Hook):
    """Hold atoms still: those whose ``tags`` (categories) are in ``categories``, or those in a
    boolean ``mask (N,)``. Zeroes their forces after compute and their velocities before the
    update and after it, so deterministic integrators and optimizers never move them. For
    stochastic thermostats use ``batch.fixed`` (ASE ``FixAtoms``), which the engine enforces."""

    categories: tuple = ()
    mask: object = None
    stages: tuple = (Stage.AFTER_COMPUTE, Stage.BEFORE_PRE_UPDATE, Stage.AFTER_POST_UPDATE)

    def __post_init__(self):
        if not self.categories and self.mask is None:
            raise ValueError("FreezeAtomsHook needs categories or a mask")
        object.__setattr__(self, "categories", tuple(int(c) for c in self.categories))
        object.__setattr__(self, "fn", self._freeze)
        super().__post_init__()

    def frozen(self, batch):
        sel = jnp.zeros(batch.num_atoms, bool)
        for c in self.categories:
            sel = sel | (batch.tags == c)
        if self.mask is not None:
            sel = sel | jnp.asarray(self.mask, bool)
        return sel & batch.atom_mask

    def _freeze(self, state, batch, ctx):
        sel = self.frozen(batch)[:, None]
        return state.replace(forces=jnp.where(sel, 0.0, state.forces),
                             velocities=jnp.where(sel, 0.0, state.velocities))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class WrapPeriodicHook(Hook):
    """Wrap positions into the cell along periodic axes every ``frequency`` steps (the
    neighbor list notices the jump and rebuilds)."""

    stages: tuple = (Stage.AFTER_STEP,)

    def __post_init__(self):
        object.__setattr__(self, "fn", self._wrap)
        super().__post_init__()

    def _wrap(self, state, batch, ctx):
        cell = gather_systems(state.cell, batch.system_index)
        periodic = gather_systems(batch.pbc, batch.system_index, False)
        # The binning frame: periodic rows are the lattice vectors and open rows complete
        # an orthogonal basis, so it is never singular (identity rows in place of the open
        # rows can lie in the periodic plane: pbc (T, F, T) with c along y).
        frame = gather_systems(binning_frame(state.cell, batch.pbc), batch.system_index)
        frac = vecmat(state.positions, inv3(frame))
        shift = jnp.where(periodic, jnp.floor(frac), 0.0)
        return state.replace(positions=state.positions - vecmat(shift, cell))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class BiasedPotentialHook(Hook):
    """Add a bias ``energy_fn(positions (N,3), cell (S,3,3), batch) -> (S,)`` eV to the model:
    its energy joins ``state.energy`` and ``-d bias/d r`` joins the forces (after compute).

    Example (a harmonic wall keeping atoms below z = 20 Å)::

        wall = lambda r, cell, b: segments.segment_sum(
            jnp.where(b.atom_mask, 0.5 * jnp.maximum(r[:, 2] - 20.0, 0.0) ** 2, 0.0),
            b.system_index, b.num_systems)
        BiasedPotentialHook(energy_fn=wall)
    """

    energy_fn: Callable | None = None
    stages: tuple = (Stage.AFTER_COMPUTE,)

    def __post_init__(self):
        if self.energy_fn is None:
            raise ValueError("BiasedPotentialHook needs energy_fn")
        object.__setattr__(self, "fn", self._bias)
        super().__post_init__()

    def _bias(self, state, batch, ctx):
        total = lambda r: jnp.sum(self.energy_fn(r, state.cell, batch))
        bias_energy = self.energy_fn(state.positions, state.cell, batch)
        grad = jax.grad(total)(state.positions)
        forces = jnp.where((batch.fixed | ~batch.atom_mask)[:, None], 0.0, state.forces - grad)
        return state.replace(energy=state.energy + bias_energy, forces=forces)
