"""The dynamics engine: a state pytree, a pure step, and a compiled run loop.

A step is ``pre_update → compute → post_update`` with hooks at nine points
(:class:`~nvalchemi_jax.dynamics.hooks.Stage`). An integrator or optimizer is a
subclass of :class:`Dynamics` that supplies only

* ``init_stage(state, batch) -> StageState`` — its per-system variables
  (``system``: leaves of leading size S, e.g. dt, thermostat chains) and
  per-atom variables (``atom``: leading size N), numbers broadcast from its
  configuration so that a changed dt or temperature never recompiles;
* ``pre_update(state, batch) -> state`` — what happens before forces are
  recomputed (e.g. a velocity half-kick and a drift);
* ``post_update(state, batch) -> state`` — what happens after (the second kick).

The engine applies updates only to the systems whose status equals the
dynamics' ``status_code`` (masked updates), keeps fixed atoms still, turns
non-finite results into a per-system failure that freezes that system alone,
and moves converged systems to the next status. See ``examples/custom_integrator.py``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax import neighbors
from nvalchemi_jax.batch import Batch, gather_systems
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.convergence import ConvergenceHook
from nvalchemi_jax.dynamics.hooks.base import Hook, HookContext, Stage, run_hooks
from nvalchemi_jax.models.base import compute
from nvalchemi_jax import segments


@struct.dataclass
class StageState:
    """An integrator's own variables: ``system`` leaves are ``(S, ...)``, ``atom`` leaves ``(N, ...)``."""

    system: dict = dataclasses.field(default_factory=dict)
    atom: dict = dataclasses.field(default_factory=dict)


@struct.dataclass
class State:
    """Everything that evolves. Per atom ``(N, ...)``: positions Å, velocities Å/fs,
    forces eV/Å. Per system ``(S, ...)``: energy eV, stress eV/Å³, cell Å,
    status, failure, step (the system's own step counter), previous_energy.
    Also the neighbor list, the integrator's :class:`StageState`, the root PRNG
    key and the global step counter."""

    positions: jax.Array
    velocities: jax.Array
    forces: jax.Array
    energy: jax.Array
    stress: jax.Array
    cell: jax.Array
    status: jax.Array
    failure: jax.Array
    step: jax.Array
    previous_energy: jax.Array
    neighbors: neighbors.NeighborList
    stage: Any
    key: jax.Array
    global_step: jax.Array


def _pick(sel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(sel.reshape(sel.shape + (1,) * (a.ndim - sel.ndim)), a, b)


def blend_stage(mask: jax.Array, new, old, batch: Batch):
    """Stage variables (one :class:`StageState` or a tuple of them) from ``new`` for systems
    where ``mask (S,)`` holds, from ``old`` elsewhere (per-atom leaves follow their system)."""
    atom = gather_systems(mask, batch.system_index, False)

    def one(a, b):
        return StageState(system=jax.tree.map(lambda x, y: _pick(mask, x, y), a.system, b.system),
                          atom=jax.tree.map(lambda x, y: _pick(atom, x, y), a.atom, b.atom))

    return jax.tree.map(one, new, old, is_leaf=lambda x: isinstance(x, StageState))


def blend_systems(mask: jax.Array, new: State, old: State, batch: Batch) -> State:
    """Take ``new`` for systems where ``mask (S,)`` holds, ``old`` elsewhere (neighbor list,
    key and global step come from ``new``). Fixed atoms keep ``old`` positions and velocities."""
    atom = gather_systems(mask, batch.system_index, False)
    moving = atom & ~batch.fixed
    return new.replace(
        positions=_pick(moving, new.positions, old.positions),
        velocities=_pick(moving, new.velocities, old.velocities),
        forces=_pick(atom, new.forces, old.forces),
        energy=_pick(mask, new.energy, old.energy),
        stress=_pick(mask, new.stress, old.stress),
        cell=_pick(mask, new.cell, old.cell),
        status=_pick(mask, new.status, old.status),
        failure=_pick(mask, new.failure, old.failure),
        step=_pick(mask, new.step, old.step),
        previous_energy=_pick(mask, new.previous_energy, old.previous_energy),
        stage=blend_stage(mask, new.stage, old.stage, batch),
    )


def _any_per_system(bad_atoms: jax.Array, batch: Batch) -> jax.Array:
    """``(S, ...)``: any padding-free True per system of ``bad_atoms (N, ...)``."""
    mask = batch.atom_mask.reshape(batch.atom_mask.shape + (1,) * (bad_atoms.ndim - 1))
    bad = jnp.where(mask, bad_atoms, False).astype(jnp.int32)
    return segments.segment_max(bad, batch.system_index, batch.num_systems) > 0


def _concrete(x) -> bool:
    """A concrete number or array (JAX also rebuilds pytrees from tracers and placeholders)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, np.ndarray, np.number, jax.Array, list, tuple))


def check_positive(owner: str, **values) -> None:
    """Host-side: every value (scalar or per-system array) is finite and > 0."""
    for name, value in values.items():
        if value is None or not _concrete(value):
            continue
        arr = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{owner}.{name} must be finite and > 0, got {value!r}")


def check_non_negative(owner: str, **values) -> None:
    for name, value in values.items():
        if value is None or not _concrete(value):
            continue
        arr = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"{owner}.{name} must be finite and >= 0, got {value!r}")


def per_system(value, batch: Batch, dtype=None) -> jax.Array:
    """A scalar or ``(S,)`` parameter as an ``(S,)`` array."""
    dtype = dtype or batch.positions.dtype
    arr = jnp.asarray(value, dtype)
    if arr.ndim == 0:
        return jnp.full((batch.num_systems,), arr, dtype)
    if arr.shape != (batch.num_systems,):
        raise ValueError(f"a per-system parameter must be a scalar or have shape "
                         f"({batch.num_systems},), got {arr.shape}")
    return arr


@struct.dataclass(eq=False)
class Dynamics:
    """Base of every integrator and optimizer: ``Integrator(model, **options)``
    (a frozen pytree: the model's
    parameters and the numeric defaults are leaves, everything else is static
    configuration; compared and hashed by identity). Subclasses are declared
    with ``@struct.dataclass(kw_only=True, eq=False)``.

    model: any model (:mod:`nvalchemi_jax.models`).
    hooks: :class:`Hook` objects, run in order at their stages.
    convergence: a :class:`ConvergenceHook`; MD stages default to a step budget
        of ``n_steps`` per system when it is given.
    n_steps: per-system step budget (MD), or ``None``.
    skin: Verlet skin of the neighbor list, Å. neighbor_method: see :func:`neighbors.allocate`.
    status_code: the status of the systems this dynamics updates (0 alone;
        fused stages give each sub-stage its own code).
    """

    model: Any
    _: dataclasses.KW_ONLY
    hooks: tuple = struct.field(pytree_node=False, default=())
    convergence: ConvergenceHook | None = struct.field(pytree_node=False, default=None)
    n_steps: int | None = struct.field(pytree_node=False, default=None)
    skin: float = struct.field(pytree_node=False, default=0.5)
    neighbor_method: str = struct.field(pytree_node=False, default="auto")
    status_code: int = struct.field(pytree_node=False, default=0)

    #: Whether the integrator itself needs the stress every step (barostats, cell relaxation).
    needs_stress = False
    #: Whether the integrator conserves (and so removes) the centre-of-mass momentum.
    conserves_momentum = True

    def __post_init__(self):
        hooks = tuple(self.hooks)
        for h in hooks:
            if not isinstance(h, Hook):
                raise TypeError(f"{type(self).__name__}.hooks must hold Hook objects, got {type(h).__name__}")
        object.__setattr__(self, "hooks", hooks)
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 0):
            raise ValueError(f"{type(self).__name__}.n_steps must be a non-negative int, got {self.n_steps!r}")
        if not self.skin >= 0:
            raise ValueError(f"{type(self).__name__}.skin must be >= 0, got {self.skin}")
        self.validate()

    # ------------------------------------------------------------ integrator API
    def validate(self) -> None:
        """Host-side parameter checks of the subclass (skip traced values)."""

    def init_stage(self, state: State, batch: Batch) -> StageState:
        return StageState()

    def pre_update(self, state: State, batch: Batch) -> State:
        return state

    def post_update(self, state: State, batch: Batch) -> State:
        return state

    # ------------------------------------------------------------ configuration
    @property
    def convergence_hook(self) -> ConvergenceHook | None:
        """The convergence test with its source/target statuses filled in."""
        hook = self.convergence
        if hook is None and self.n_steps is not None:
            hook = ConvergenceHook.from_steps(self.n_steps)
        if hook is None:
            return None
        source = self.status_code if hook.source_status is None else hook.source_status
        target = source + 1 if hook.target_status is None else hook.target_status
        return dataclasses.replace(hook, source_status=source, target_status=target)

    @property
    def exit_status(self) -> int:
        hook = self.convergence_hook
        return self.status_code + 1 if hook is None else hook.target_status

    @property
    def wants_stress(self) -> bool:
        hook = self.convergence_hook
        return self.needs_stress or (hook is not None and hook.needs_stress())

    def check(self, batch: Batch) -> None:
        """Host-side checks against a concrete batch (model parameters, stress needs)."""
        if hasattr(self.model, "check") and _concrete(batch.atomic_numbers):
            self.model.check(batch)
        if self.wants_stress:
            if not getattr(self.model, "supports_stress", True):
                raise ValueError(f"{type(self).__name__} needs the stress but model "
                                 f"{type(self.model).__name__} does not provide it")
            if _concrete(batch.pbc):
                pbc = np.asarray(batch.pbc)[np.asarray(batch.system_mask)]
                bad = np.flatnonzero(~pbc.all(axis=1))
                if bad.size:
                    ids = np.asarray(batch.sample_id)[np.asarray(batch.system_mask)][bad]
                    raise ValueError(f"{type(self).__name__} needs the stress, which needs periodic "
                                     f"cells on all axes: systems {bad[:10].tolist()} (sample_ids "
                                     f"{ids[:10].tolist()}) are not fully periodic")

    # ------------------------------------------------------------ init / step
    def init(self, batch: Batch, key: jax.Array | None = None,
             neighbor_spec: neighbors.NeighborSpec | None = None) -> State:
        """The initial state: forces (and stress if needed) computed, integrator variables set.

        Without ``neighbor_spec`` the neighbor list is allocated on the host from
        ``batch`` (so call ``init`` outside ``jit``, or pass a spec to jit it).
        """
        self.check(batch)
        if key is None:
            key = jax.random.key(0)
        if isinstance(batch.positions, jax.core.Tracer):
            if neighbor_spec is None:
                raise ValueError("init under jit needs a neighbor_spec (allocation happens on the host)")
            nl = neighbors.build(neighbor_spec, batch.positions, batch.cell, batch)
            return self._initial_state(batch, key, nl)
        if neighbor_spec is None:
            _, nl = neighbors.allocate(batch, cutoff=self.model.cutoff, skin=self.skin,
                                       method=self.neighbor_method)
        else:
            nl = neighbors._build_jit(neighbor_spec, batch.positions, batch.cell, batch)
        return _initial_state(self, batch, key, nl)

    def _initial_state(self, batch: Batch, key: jax.Array, nl: neighbors.NeighborList) -> State:
        dtype = batch.positions.dtype
        n_sys = batch.num_systems
        status = jnp.where(batch.system_mask, self.status_code, status_codes.EMPTY).astype(jnp.int32)
        velocities = jnp.where((batch.atom_mask & ~batch.fixed)[:, None], batch.velocities, 0.0)
        state = State(
            positions=batch.positions, velocities=velocities, forces=jnp.zeros_like(batch.positions),
            energy=jnp.zeros(n_sys, dtype), stress=jnp.zeros((n_sys, 3, 3), dtype), cell=batch.cell,
            status=status, failure=jnp.zeros(n_sys, jnp.int32), step=jnp.zeros(n_sys, jnp.int32),
            previous_energy=jnp.full(n_sys, jnp.inf, dtype), neighbors=nl, stage=StageState(),
            key=key, global_step=jnp.zeros((), jnp.int32))
        state = self.compute(state, batch)
        state = state.replace(previous_energy=jnp.full(n_sys, jnp.inf, dtype))
        state = state.replace(stage=self.init_stage(state, batch))
        return self._mark_failures(state, state, batch, batch.system_mask)

    def compute(self, state: State, batch: Batch) -> State:
        """Update the neighbor list and evaluate the model (forces on fixed atoms zeroed)."""
        nl = neighbors.update(state.neighbors, state.positions, state.cell, batch)
        out = compute(self.model, state.positions, state.cell, batch, nl, forces=True,
                      stress=self.wants_stress)
        forces = jnp.where((batch.fixed | ~batch.atom_mask)[:, None], 0.0, out.forces)
        return state.replace(neighbors=nl, forces=forces, energy=out.energy,
                             stress=out.stress if self.wants_stress else state.stress,
                             previous_energy=state.energy)

    def _mark_failures(self, start: State, state: State, batch: Batch, active: jax.Array) -> State:
        # Per system at every step, without a conditional: gating this behind one global
        # finiteness test (a conditional node in the step's CUDA graph) was slower at every
        # size on an H200 (results/probe_syncs_h200_2026-11-29_c_step-gates.jsonl).
        finite = lambda x: jnp.isfinite(x)
        # Model outputs first: a NaN force makes velocities NaN a half step later,
        # and the report should name the cause.
        # Both per-atom checks in one per-system reduction (this runs at every step).
        bad_atoms = _any_per_system(jnp.stack([
            ~jnp.all(finite(state.forces), axis=-1),
            ~jnp.all(finite(state.positions) & finite(state.velocities), axis=-1)], axis=-1), batch)
        reasons = [
            (status_codes.Failure.NONFINITE_ENERGY, ~finite(state.energy)),
            (status_codes.Failure.NONFINITE_FORCES, bad_atoms[:, 0]),
        ]
        if self.wants_stress:
            reasons.append((status_codes.Failure.NONFINITE_STRESS,
                            ~jnp.all(finite(state.stress), axis=(-2, -1))))
        reasons += [
            (status_codes.Failure.NONFINITE_CELL, ~jnp.all(finite(state.cell), axis=(-2, -1))),
            (status_codes.Failure.NONFINITE_POSITIONS, bad_atoms[:, 1]),
        ]
        reason = jnp.zeros_like(state.failure)
        for code, bad in reversed(reasons):          # the first listed reason wins
            reason = jnp.where(bad, int(code), reason)
        failed = active & (reason > 0) & (state.status != status_codes.FAILED)
        # The failed system goes back to its last finite configuration; shared parts
        # (neighbor list, key, step counter) stay those of the new state.
        frozen = start.replace(status=jnp.full_like(start.status, status_codes.FAILED),
                               failure=reason, forces=jnp.zeros_like(start.forces),
                               velocities=jnp.zeros_like(start.velocities),
                               neighbors=state.neighbors, key=state.key,
                               global_step=state.global_step)
        return blend_systems(failed, frozen, state, batch)

    def _converge(self, state: State, batch: Batch, active: jax.Array) -> tuple[State, jax.Array]:
        """Active systems that meet the convergence test move to its target status;
        returns the state and ``(S,) bool`` of the systems that moved."""
        conv = self.convergence_hook
        if conv is None:
            return state, jnp.zeros_like(active)
        converged = conv.met(state, batch) & (state.status == conv.source_status) & active
        return state.replace(status=jnp.where(converged, conv.target_status, state.status)), converged

    def running(self, state: State, batch: Batch) -> jax.Array:
        """``(S,) bool``: systems this dynamics still updates."""
        return (state.status == self.status_code) & batch.system_mask

    def __add__(self, other: "Dynamics"):
        """``a + b``: a :class:`~nvalchemi_jax.dynamics.fused.FusedStage` (one model evaluation per step)."""
        from nvalchemi_jax.dynamics.fused import fuse
        return fuse(self, other)

    def step(self, state: State, batch: Batch) -> State:
        """One step for every system whose status is ``status_code``; pure and jit-able."""
        start = state
        hooks = self.hooks
        active = self.running(state, batch)
        ctx = HookContext(step=state.global_step, active=active, converged=jnp.zeros_like(active))
        state = run_hooks(hooks, Stage.BEFORE_STEP, state, batch, ctx)
        state = run_hooks(hooks, Stage.BEFORE_PRE_UPDATE, state, batch, ctx)
        state = blend_systems(active, self.pre_update(state, batch), state, batch)
        state = run_hooks(hooks, Stage.AFTER_PRE_UPDATE, state, batch, ctx)
        state = run_hooks(hooks, Stage.BEFORE_COMPUTE, state, batch, ctx)
        state = self.compute(state, batch)
        state = run_hooks(hooks, Stage.AFTER_COMPUTE, state, batch, ctx)
        state = run_hooks(hooks, Stage.BEFORE_POST_UPDATE, state, batch, ctx)
        state = blend_systems(active, self.post_update(state, batch), state, batch)
        state = run_hooks(hooks, Stage.AFTER_POST_UPDATE, state, batch, ctx)
        state = state.replace(step=state.step + active.astype(jnp.int32))
        state = self._mark_failures(start, state, batch, active)
        state, converged = self._converge(state, batch, active)
        ctx = ctx.replace(converged=converged)
        if any(Stage.ON_CONVERGE in h.stages for h in hooks):
            state = jax.lax.cond(jnp.any(converged),
                                 lambda s: run_hooks(hooks, Stage.ON_CONVERGE, s, batch, ctx),
                                 lambda s: s, state)
        state = run_hooks(hooks, Stage.AFTER_STEP, state, batch, ctx)
        return state.replace(global_step=state.global_step + 1)

    # ------------------------------------------------------------ run
    def run(self, batch: Batch | None = None, state: State | None = None, key: jax.Array | None = None,
            max_steps: int | None = None, chunk_size: int = 100, progress: bool = False,
            sampler=None, sinks=None, refill_frequency: int = 10, on_device: bool = False):
        """Run compiled chunks of ``chunk_size`` steps until no system is active or
        ``max_steps`` steps were taken (default: ``n_steps``, else 10,000).

        Between chunks (never inside one) the host checks the neighbor list: on
        overflow it grows the capacity, recompiles once, and redoes the chunk
        from its start, so no step is lost; observer hooks get their records.

        With ``sampler=`` (a :class:`~nvalchemi_jax.dynamics.sampler.SizeAwareSampler`)
        and ``sinks=``, runs inflight instead: finished systems go to the sinks and
        their slots are refilled every ``refill_frequency`` steps until the dataset
        is exhausted (see :mod:`nvalchemi_jax.dynamics.inflight`); returns an
        :class:`~nvalchemi_jax.dynamics.inflight.InflightResult`. With ``on_device=True``
        the whole dataset is uploaded once and refills are decided on the device, inside
        compiled calls of ``chunk_size`` steps (see
        :mod:`nvalchemi_jax.dynamics.device_inflight`): no host work between periods, so
        ``refill_frequency`` can be small; frames reach the sinks when the run ends.
        """
        if sampler is not None:
            if batch is not None or state is not None:
                raise ValueError("run(sampler=...) builds its own batch; do not pass batch or state")
            if on_device:
                from nvalchemi_jax.dynamics.device_inflight import run_on_device
                return run_on_device(self, sampler, sinks, key=key, refill_frequency=refill_frequency,
                                     max_steps=max_steps, progress=progress, chunk_size=chunk_size)
            from nvalchemi_jax.dynamics.inflight import run_inflight
            return run_inflight(self, sampler, sinks, key=key, refill_frequency=refill_frequency,
                                max_steps=max_steps, progress=progress)
        if on_device:
            raise ValueError("run(on_device=True) is for inflight runs: pass a sampler and sinks")
        if batch is None:
            raise ValueError("run needs a batch (or a sampler and sinks)")
        from nvalchemi_jax.dynamics.run import run_loop
        return run_loop(self, batch, state=state, key=key, max_steps=max_steps,
                        chunk_size=chunk_size, progress=progress)


@jax.jit
def _initial_state(dyn: Dynamics, batch: Batch, key: jax.Array, nl: neighbors.NeighborList) -> State:
    return dyn._initial_state(batch, key, nl)


@dataclasses.dataclass
class RunResult:
    """What :meth:`Dynamics.run` returns (host side).

    state: the final :class:`State`. steps: global steps taken. converged /
    failed: ``(S,) bool`` (numpy) over slots. failures: ``{slot: message}``.
    seconds: wall time. chunks: compiled chunks executed (redone ones included).
    """

    state: State
    steps: int
    converged: np.ndarray
    failed: np.ndarray
    failures: dict
    seconds: float
    chunks: int
    regrows: int = 0

    def to_atoms(self, batch: Batch) -> list:
        s = self.state
        return batch.to_atoms(positions=s.positions, velocities=s.velocities, cell=s.cell,
                              energy=s.energy, forces=s.forces, stress=s.stress)
