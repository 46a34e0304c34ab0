"""Any optax gradient transformation as a per-system geometry optimizer.

The positions are the parameters and ``-forces`` the gradient. Optax
transformations that reduce over all parameters (``optax.lbfgs``'s dot
products, ``clip_by_global_norm``, ...) must see one system at a time, so every
step gathers each system's atoms into a padded ``(S, A, 3)`` block (``A`` atoms
per system, padding zero), runs the transformation under ``jax.vmap`` over
systems with per-system optimizer state, and scatters the updates back to the
flat ``(N, 3)`` layout. Elementwise transformations (sgd, adam) give the same
result either way; reductions stay within a system, so a system relaxes
exactly as it would alone.

The optimizer state lives in ``state.stage.system["opt_state"]`` (every leaf with
leading dimension S); ``state.stage.system["atom_index"]`` is the ``(S, A)`` table
of flat atom indices (``N`` marks an empty place), rebuilt from the batch each
step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics.base import Dynamics, StageState, check_positive, per_system
from nvalchemi_jax.dynamics.thermo import local_atom_index


def atom_table(batch, max_atoms: int) -> jax.Array:
    """``(S, max_atoms) int32``: the flat index of atom ``j`` of system ``s`` (``N`` where the
    system has fewer atoms; atoms beyond ``max_atoms`` are left out)."""
    n_sys, n_atoms = batch.num_systems, batch.num_atoms
    table = jnp.full((n_sys, max_atoms), n_atoms, jnp.int32)
    # Padding atoms point at system S, out of range: the scatter drops them.
    return table.at[batch.system_index, local_atom_index(batch)].set(
        jnp.arange(n_atoms, dtype=jnp.int32), mode="drop")


def to_padded(values: jax.Array, table: jax.Array) -> jax.Array:
    """Per-atom ``(N, ...)`` values as a per-system ``(S, A, ...)`` block (zeros where empty)."""
    return jnp.take(values, table, axis=0, mode="fill", fill_value=0)


def from_padded(block: jax.Array, batch) -> jax.Array:
    """A per-system ``(S, A, ...)`` block back to per-atom ``(N, ...)`` (padding atoms get 0)."""
    n_sys, max_atoms = block.shape[:2]
    flat = block.reshape((n_sys * max_atoms,) + block.shape[2:])
    local = local_atom_index(batch)
    index = jnp.where(batch.atom_mask & (local < max_atoms),
                      batch.system_index * max_atoms + local, n_sys * max_atoms)
    return jnp.take(flat, index, axis=0, mode="fill", fill_value=0)


def _takes_extra_args(optimizer) -> bool:
    return isinstance(optimizer, optax.GradientTransformationExtraArgs)


def _update(optimizer, grad, opt_state, params, value):
    """One system's optax update; ``value`` (its energy) and ``grad`` go to transformations
    that accept extra arguments (e.g. ``optax.contrib.reduce_on_plateau``)."""
    if _takes_extra_args(optimizer):
        return optimizer.update(grad, opt_state, params, value=value, grad=grad)
    return optimizer.update(grad, opt_state, params)


@struct.dataclass(kw_only=True, eq=False)
class OptaxRelaxer(Dynamics):
    """Relax positions with any optax ``GradientTransformation``, one optimizer state per system.

    optimizer: e.g. ``optax.adam(1e-2)`` (updates are displacements in Å, so the
        learning rate is a length scale), ``optax.sgd(...)``, or
        ``optax.lbfgs(linesearch=None)`` / ``optax.scale_by_lbfgs()`` chained with a
        scale. Each system's energy (eV) is passed as ``value=`` (and the gradient as
        ``grad=``) to transformations that take extra arguments. Line searches
        that call the objective (``value_fn``: optax.lbfgs's default zoom line
        search, ``scale_by_backtracking_linesearch``) cannot be used — an energy
        evaluation of a single system inside the step is not available — so
        build L-BFGS with ``linesearch=None`` (and a ``max_step`` as the safeguard).
    max_step: optional cap on each atom's displacement per step, Å, scalar or ``(S,)`` (the
        transformation still sees the displacement actually taken: it gets the
        true positions each step).
    max_atoms: the static per-system block size ``A``. Default: the largest
        system of the batch given to :meth:`init` (or ``N`` when ``init`` runs
        under jit). Set it when larger systems may be swapped in later.

    Velocities are not used and are set to zero.

    Example::

        relax = OptaxRelaxer(model, optimizer=optax.lbfgs(linesearch=None), max_step=0.2,
                             convergence=ConvergenceHook.from_fmax(0.05))
        result = relax.run(batch)
    """

    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    max_step: float | None = None
    max_atoms: int | None = struct.field(pytree_node=False, default=None)

    conserves_momentum = False
    #: A fused stage entering this optimizer sets the velocities to zero.
    zero_velocities_on_entry = True

    def validate(self):
        name = type(self).__name__
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(f"{name}.optimizer must be an optax.GradientTransformation, "
                            f"got {type(self.optimizer).__name__}")
        check_positive(name, max_step=self.max_step)
        if self.max_atoms is not None and (not isinstance(self.max_atoms, (int, np.integer))
                                           or self.max_atoms < 1):
            raise ValueError(f"{name}.max_atoms must be a positive int or None, got {self.max_atoms!r}")

    def check(self, batch) -> None:
        super().check(batch)
        name = type(self).__name__
        n_atoms = batch.n_atoms
        if self.max_atoms is not None and not isinstance(n_atoms, jax.core.Tracer):
            largest = int(np.max(np.asarray(n_atoms), initial=0))
            if largest > self.max_atoms:
                raise ValueError(f"{name}.max_atoms={self.max_atoms} is smaller than the largest "
                                 f"system of the batch ({largest} atoms)")
        # Fail early, with a message, on transformations that need more than we can give.
        params = jnp.zeros((2, 3), batch.positions.dtype)
        try:
            jax.eval_shape(lambda p: _update(self.optimizer, p, self.optimizer.init(p), p,
                                             jnp.zeros((), p.dtype)), params)
        except TypeError as err:
            if "value_fn" in str(err):
                raise ValueError(
                    f"{name}.optimizer needs value_fn (a line search that re-evaluates the "
                    "energy), which a relaxer step cannot provide: build it without one, e.g. "
                    "optax.lbfgs(linesearch=None)") from err
            raise

    def init(self, batch, key=None, neighbor_spec=None):
        dyn = self
        if self.max_atoms is None and not isinstance(batch.n_atoms, jax.core.Tracer):
            dyn = self.replace(max_atoms=max(int(np.max(np.asarray(batch.n_atoms), initial=0)), 1))
        return Dynamics.init(dyn, batch, key, neighbor_spec)

    def init_stage(self, state, batch):
        max_atoms = batch.num_atoms if self.max_atoms is None else self.max_atoms
        table = atom_table(batch, max_atoms)
        opt_state = jax.vmap(self.optimizer.init)(to_padded(state.positions, table))
        return StageState(system={"opt_state": opt_state, "atom_index": table})

    def pre_update(self, state, batch):
        sys = state.stage.system
        table = atom_table(batch, sys["atom_index"].shape[1])
        params = to_padded(state.positions, table)
        grad = -to_padded(state.forces, table)
        updates, opt_state = jax.vmap(lambda g, s, p, e: _update(self.optimizer, g, s, p, e))(
            grad, sys["opt_state"], params, state.energy)
        dr = jnp.where((batch.atom_mask & ~batch.fixed)[:, None], from_padded(updates, batch), 0.0)
        if self.max_step is not None:
            cap = gather_systems(per_system(self.max_step, batch), batch.system_index)[:, None]
            norm = jnp.linalg.norm(dr, axis=-1, keepdims=True)
            dr = dr * jnp.minimum(1.0, cap / jnp.where(norm > 0, norm, 1.0))
        return state.replace(positions=state.positions + dr.astype(state.positions.dtype),
                             velocities=jnp.zeros_like(state.velocities),
                             stage=state.stage.replace(system={"opt_state": opt_state,
                                                               "atom_index": table}))
