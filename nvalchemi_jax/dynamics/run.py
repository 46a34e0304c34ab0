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
    system are skipped), plus the observers' records of every step."""
    observers = _observers(dyn)

    def body(state, i):
        active = dyn.running(state, batch)
        go = (i < limit) & jnp.any(active)
        before, old_status = state.global_step, state.status
        state = jax.lax.cond(go, lambda s: dyn.step(s, batch), lambda s: s, state)
        # Systems that left a stage in this step (converged), as ON_CONVERGE hooks see them.
        converged = active & (state.status != old_status) & (state.status != status_codes.FAILED)
        ctx = HookContext(step=before, active=active, converged=converged)
        records, due = [], []
        for hook in observers:
            is_due = go & hook.due(before)
            shape = jax.eval_shape(lambda s: hook.record(s, batch, ctx), state)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shape)
            records.append(jax.lax.cond(is_due, lambda s: hook.record(s, batch, ctx),
                                        lambda s: zeros, state))
            due.append(is_due)
        return state, (tuple(records), tuple(due), before, go)

    return jax.lax.scan(body, state, jnp.arange(length, dtype=jnp.int32))


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
            limit = min(chunk_size, max_steps - taken)
            new, (records, due, steps, went) = run_chunk(dyn, state, batch, limit, length=chunk_size)
            chunks += 1
            if bool(new.neighbors.overflow):
                # Grow the neighbor capacity, rebuild from the chunk's start, redo the chunk.
                spec = neighbors.grow(new.neighbors)
                state = state.replace(neighbors=neighbors.build(spec, state.positions, state.cell, batch))
                regrows += 1
                continue
            state = new
            went = np.asarray(went)
            taken += int(went.sum())
            for hook, rec, d in zip(_observers(dyn), records, due):
                hook.on_host(jax.tree.map(np.asarray, rec), np.asarray(d), np.asarray(steps))
            if bar is not None:
                bar.update(taken, state, dyn)
            if not went.any():
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
