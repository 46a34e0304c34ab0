"""The host-side run loop: compiled chunks of steps, overflow regrowth, observers, progress."""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import neighbors
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.hooks.base import HookContext


def _observers(dyn):
    return tuple(h for h in dyn.hooks if h.record is not None)


@partial(jax.jit, static_argnames=("length",))
def run_chunk(dyn, state, batch, limit, length: int):
    """``length`` steps in one ``lax.scan`` (steps at index >= ``limit`` or with no active
    system are skipped). Each observer hook's records are written, on due steps only, into
    a device buffer with one row per due step (``ceil(length / frequency) + 1`` rows), so
    the host later fetches just those rows."""
    observers = _observers(dyn)

    def empty_buffer(hook):
        rows = min(length, -(-length // hook.frequency) + 1)
        ctx = HookContext(step=state.global_step, active=batch.system_mask, converged=batch.system_mask)
        shape = jax.eval_shape(lambda s: hook.record(s, batch, ctx), state)
        return (jax.tree.map(lambda x: jnp.zeros((rows,) + x.shape, x.dtype), shape),
                jnp.zeros(rows, jnp.int32), jnp.zeros((), jnp.int32))

    def body(carry, i):
        state, buffers = carry
        active = dyn.running(state, batch)
        go = (i < limit) & jnp.any(active)
        before, old_status = state.global_step, state.status
        state = jax.lax.cond(go, lambda s: dyn.step(s, batch), lambda s: s, state)
        # Systems that left a stage in this step (converged), as ON_CONVERGE hooks see them.
        converged = active & (state.status != old_status) & (state.status != status_codes.FAILED)
        ctx = HookContext(step=before, active=active, converged=converged)
        new_buffers = []
        for hook, (rows, steps, count) in zip(observers, buffers):
            def write(args, hook=hook):
                rows, steps, count = args
                record = hook.record(state, batch, ctx)
                rows = jax.tree.map(lambda buf, r: buf.at[count].set(r), rows, record)
                return rows, steps.at[count].set(before), count + 1
            new_buffers.append(jax.lax.cond(go & hook.due(before), write, lambda a: a, (rows, steps, count)))
        return (state, tuple(new_buffers)), go

    buffers = tuple(empty_buffer(h) for h in observers)
    (state, buffers), went = jax.lax.scan(body, (state, buffers), jnp.arange(length, dtype=jnp.int32))
    return state, (buffers, went)


def regrown(start, overflowed, batch):
    """``start`` with a neighbor list large enough for what ``overflowed`` needed, rebuilt at
    the chunk's start (a new shape: one recompilation), so the chunk can be redone."""
    spec = neighbors.grow(overflowed.neighbors)
    return start.replace(neighbors=neighbors._build_jit(spec, start.positions, start.cell, batch))


def advance(dyn, state, batch, limit: int, length: int):
    """One compiled chunk from the host: ``(state, steps taken, regrew)``. On neighbor-list
    overflow the chunk is dropped and ``state`` comes back with a larger list (redo it);
    otherwise observers get their rows."""
    new, (buffers, went) = run_chunk(dyn, state, batch, limit, length=length)
    if bool(new.neighbors.overflow):
        return regrown(state, new, batch), 0, True
    hand_over(_observers(dyn), buffers)
    return new, int(np.asarray(went).sum()), False


def hand_over(observers, buffers) -> None:
    """Give each observer the rows it recorded in the last chunk (only those cross to the host)."""
    for hook, (rows, steps, count) in zip(observers, buffers):
        n = int(count)
        if n:
            records = jax.tree.map(lambda x: np.asarray(x[:n]), rows)
            hook.on_host(records, np.ones(n, bool), np.asarray(steps[:n]))


def _any_active(dyn, state, batch) -> bool:
    return bool(jnp.any(dyn.running(state, batch)))


def run_loop(dyn, batch, state=None, key=None, max_steps=None, chunk_size=100, progress=False):
    from nvalchemi_jax.dynamics.base import RunResult

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_steps is None:
        max_steps = dyn.n_steps if dyn.n_steps is not None else 10_000
    t0 = time.perf_counter()
    if state is None:
        state = dyn.init(batch, key)
    else:
        dyn.check(batch)
    bar = _Progress(max_steps, batch) if progress else None
    taken = chunks = regrows = 0
    try:
        while taken < max_steps and _any_active(dyn, state, batch):
            state, went, regrew = advance(dyn, state, batch, min(chunk_size, max_steps - taken), chunk_size)
            chunks += 1
            regrows += regrew
            if regrew:
                continue
            taken += went
            if bar is not None:
                bar.update(taken, state, dyn)
            if not went:
                break
    finally:
        if bar is not None:
            bar.close()
    status = np.asarray(state.status)
    mask = np.asarray(batch.system_mask)
    failed = mask & (status == status_codes.FAILED)
    failure = np.asarray(state.failure)
    return RunResult(
        state=state, steps=int(state.global_step), converged=mask & (status == dyn.exit_status),
        failed=failed, failures={int(s): status_codes.message(failure[s]) for s in np.flatnonzero(failed)},
        seconds=time.perf_counter() - t0, chunks=chunks, regrows=regrows)


class _Progress:
    """A rich progress bar updated between chunks (never inside one)."""

    def __init__(self, total, batch, unit="steps"):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.n_systems = int(np.asarray(batch.system_mask).sum())
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} " + unit), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"))
        self.task = self.bar.add_task("running", total=total, info="")
        self.bar.start()

    def update(self, taken, state, dyn):
        status = np.asarray(state.status)
        done = int((status == dyn.exit_status).sum())
        failed = int((status == status_codes.FAILED).sum())
        self.bar.update(self.task, completed=taken,
                        info=f"{done}/{self.n_systems} done, {failed} failed")

    def update_samples(self, written, state, dyn):
        failed = int((np.asarray(state.status) == status_codes.FAILED).sum())
        self.bar.update(self.task, completed=written, info=f"{failed} failed in batch")

    def close(self):
        self.bar.stop()
