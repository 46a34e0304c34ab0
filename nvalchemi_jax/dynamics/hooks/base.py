"""Hooks: pure functions called at named phases of every step, inside the compiled loop."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import jax
from flax import struct


class Stage(enum.IntEnum):
    """Where in a step a hook runs. A step is pre_update → compute → post_update."""

    BEFORE_STEP = 0
    BEFORE_PRE_UPDATE = 1
    AFTER_PRE_UPDATE = 2
    BEFORE_COMPUTE = 3
    AFTER_COMPUTE = 4
    BEFORE_POST_UPDATE = 5
    AFTER_POST_UPDATE = 6
    AFTER_STEP = 7
    ON_CONVERGE = 8


@struct.dataclass
class HookContext:
    """What a hook sees besides the state and the batch.

    stage: the :class:`Stage` being run (static). step: ``()`` int32 index of the
    step being taken (0-based, counted over the whole run). active: ``(S,) bool``
    systems this dynamics updates in this step. converged: ``(S,) bool`` systems
    that converged in this step (meaningful at ON_CONVERGE and AFTER_STEP).
    """

    step: jax.Array
    active: jax.Array
    converged: jax.Array
    stage: int = struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True)
class Hook:
    """A function called at ``stages`` every ``frequency`` steps.

    fn: ``(state, batch, ctx) -> state``, pure; may modify the state (clamp
    forces, freeze atoms, wrap positions, add a bias). Called through
    ``lax.cond`` so it costs nothing on steps where it is not due.

    record / on_host: for observers that need the host (logging, snapshots):
    ``record(state, batch, ctx) -> pytree`` is evaluated on device at the end
    of due steps only and kept in a device buffer (one row per due step; the step's
    own skip test chooses between skipping, stepping, and stepping and recording);
    between chunks the run loop calls ``on_host(records, due, steps)`` with the
    rows recorded in that chunk (numpy, leading axis = due steps), a ``due``
    mask (all True) and the step indices. No device→host transfer happens
    inside a chunk; the chunk's buffers cross afterwards.

    Hooks run in registration order.

    Example::

        def clamp(state, batch, ctx):
            return state.replace(forces=jnp.clip(state.forces, -5.0, 5.0))
        Hook(clamp, stages=(Stage.AFTER_COMPUTE,))
    """

    fn: Callable | None = None
    stages: tuple[Stage, ...] = (Stage.AFTER_STEP,)
    frequency: int = 1
    record: Callable | None = None
    on_host: Callable | None = None
    name: str = ""

    def __post_init__(self):
        stages = (self.stages,) if isinstance(self.stages, (Stage, int)) else tuple(self.stages)
        object.__setattr__(self, "stages", tuple(Stage(s) for s in stages))
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"Hook.frequency must be a positive int, got {self.frequency!r}")
        if self.fn is None and self.record is None:
            raise ValueError("Hook needs fn (modifies state) or record (observes it), or both")
        if (self.record is None) != (self.on_host is None):
            raise ValueError("Hook.record and Hook.on_host go together")
        if not self.name:
            fn = self.fn or self.record
            name = getattr(fn, "__name__", "hook") if type(self) is Hook else type(self).__name__
            object.__setattr__(self, "name", name)

    def due(self, step: jax.Array) -> jax.Array:
        return step % self.frequency == 0


def run_hooks(hooks: tuple, stage: Stage, state: Any, batch: Any, ctx: HookContext) -> Any:
    """Apply every hook registered for ``stage`` (in order), each gated by its frequency."""
    ctx = ctx.replace(stage=int(stage))
    for hook in hooks:
        if hook.fn is None or stage not in hook.stages:
            continue
        if hook.frequency == 1:
            state = hook.fn(state, batch, ctx)
        else:
            state = jax.lax.cond(hook.due(ctx.step), lambda s: hook.fn(s, batch, ctx), lambda s: s, state)
    return state
