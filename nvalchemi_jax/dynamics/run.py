"""The host-side run loop: compiled chunks of steps, overflow regrowth, observers, progress.

Chunks are dispatched ahead: chunk k + 1 is queued on the device before the host waits
for chunk k, so the host's work between chunks (observers, progress) overlaps the
device's. States are immutable, so a speculative chunk computed from a chunk that
overflowed its neighbor list is simply dropped and redone after regrowth.

The engine's chunks are launched from a worker thread: should a launch block (a GPU
conditional that XLA could not record into a CUDA graph reads its predicate on the host,
see ``CHUNK_COMPILER_OPTIONS``), that wait overlaps the caller's host work. The fused NVE
chunks keep their conditionals in the CUDA graph (with ``CHUNK_COMPILER_OPTIONS`` and XLA's
command buffers on, as by default), so their launches do not wait on the device, and they
launch from the caller's thread (see :func:`dispatch`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import neighbors
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics import leapfrog, persistent
from nvalchemi_jax.dynamics.resident import parts_for, plan as plan_resident, steps as resident_steps
from nvalchemi_jax.dynamics.hooks.base import HookContext


def _observers(dyn):
    return tuple(h for h in dyn.hooks if h.record is not None)


# XLA options of the compiled chunks. With them a GPU runs a chunk's conditionals (the step
# switch, the neighbor-list rebuild) as conditional nodes of CUDA graphs instead of copying
# each predicate to the host and waiting for it: command sequences of any length become
# graphs, and sorts use XLA's own kernels (CUB's radix sort, which XLA picks for large
# arrays, cannot be recorded into a graph, and the one in a rebuild kept two host round
# trips per step from B = 1,024 up). H200, 2026-11-29 (results/probe_syncs_h200_2026-11-29_*):
# device-to-host copies per step 2 -> 0 at every size; W1 B = 1 222 -> 67 µs per step;
# builds as fast or faster (1,024 x 256: 1.32 -> 1.16 ms). Ignored off GPUs.
CHUNK_COMPILER_OPTIONS = {"xla_gpu_graph_min_graph_size": 1, "xla_gpu_enable_cub_radix_sort": False}


def chunk_steps(dyn, state, batch, limit, length: int, resident: int = 0, fused: bool = False,
                parts: int = 0, grid: int = 0):
    """``length`` steps in one ``lax.scan`` (steps at index >= ``limit`` or with no active
    system are skipped); with ``resident`` (from :func:`~nvalchemi_jax.dynamics.resident.plan`,
    the atoms per kernel program; ``parts``: programs per system, see
    :func:`~nvalchemi_jax.dynamics.resident.parts_for`), ``limit`` steps inside one kernel call instead; with
    ``fused`` (from :func:`~nvalchemi_jax.dynamics.leapfrog.plan`), NVE in leapfrog form (in the
    persistent kernel with ``grid`` programs, see :mod:`~nvalchemi_jax.dynamics.persistent`). Each
    observer hook's records are written, on due steps only, into a device buffer with one row per due step (``length`` consecutive steps hold at most
    ``ceil(length / frequency)`` multiples of ``frequency``), so the host later fetches
    just those rows.

    Returns ``(state, (buffers, flags))``; ``flags (3,) int32`` = (neighbor-list overflow,
    steps taken, any system still active): all the host needs, in one small fetch."""
    observers = _observers(dyn)
    if resident:
        state, went = resident_steps(dyn, state, batch, limit, resident, parts)
        return state, ((), _flags(dyn, state, batch, went))
    if fused:
        state, went = leapfrog.steps(dyn, state, batch, limit, length, grid)
        return state, ((), _flags(dyn, state, batch, went))

    def empty_buffer(hook):
        rows = -(-length // hook.frequency)
        ctx = HookContext(step=state.global_step, active=batch.system_mask, converged=batch.system_mask)
        shape = jax.eval_shape(lambda s: hook.record(s, batch, ctx), state)
        return (jax.tree.map(lambda x: jnp.zeros((rows,) + x.shape, x.dtype), shape),
                jnp.zeros(rows, jnp.int32), jnp.zeros((), jnp.int32))

    def body(carry, i):
        state, buffers = carry
        active = dyn.running(state, batch)
        go = (i < limit) & jnp.any(active)
        before = state.global_step
        due = [go & hook.due(before) for hook in observers]

        def skip(state, buffers):
            return state, buffers

        def advance(state, buffers):
            return dyn.step(state, batch), buffers

        def advance_and_record(state, buffers):
            new = dyn.step(state, batch)
            # Systems that left a stage in this step (converged), as ON_CONVERGE hooks see them.
            converged = active & (new.status != state.status) & (new.status != status_codes.FAILED)
            ctx = HookContext(step=before, active=active, converged=converged)
            written = []
            for hook, now, (rows, steps, count) in zip(observers, due, buffers):
                slot = jnp.where(now, count, steps.shape[0])      # past the end: dropped
                record = hook.record(new, batch, ctx)
                rows = jax.tree.map(lambda buf, r: buf.at[slot].set(r, mode="drop"), rows, record)
                written.append((rows, steps.at[slot].set(before, mode="drop"), count + now.astype(count.dtype)))
            return new, tuple(written)

        # One switch per step: the step is skipped, taken, or taken and recorded. Records
        # are computed on due steps only, and a GPU reads one predicate per step (the
        # host decides a conditional's branch), as for a plain skip test.
        if observers:
            index = jnp.where(go, jnp.where(jnp.any(jnp.stack(due)), 2, 1), 0)
            branches = (skip, advance, advance_and_record)
        else:
            index, branches = go.astype(jnp.int32), (skip, advance)
        state, buffers = jax.lax.switch(index, branches, state, buffers)
        return (state, buffers), go

    buffers = tuple(empty_buffer(h) for h in observers)
    (state, buffers), went = jax.lax.scan(body, (state, buffers), jnp.arange(length, dtype=jnp.int32))
    return state, (buffers, _flags(dyn, state, batch, went.sum(dtype=jnp.int32)))


def _flags(dyn, state, batch, went):
    """(neighbor-list overflow, steps taken, any system still active) as ``(3,) int32``."""
    return jnp.stack([state.neighbors.overflow.astype(jnp.int32), went.astype(jnp.int32),
                      jnp.any(dyn.running(state, batch)).astype(jnp.int32)])


# Compiled at the top level only: JAX refuses compiler options on a jit nested in another
# (jit `chunk_steps` with the options to use it inside a larger program).
run_chunk = jax.jit(chunk_steps, static_argnames=("length", "resident", "fused", "parts", "grid"),
                    compiler_options=CHUNK_COMPILER_OPTIONS)


# Chunks queued beyond the one the host waits for; each costs a state's memory. More did not
# help on an H200 (W2 32,000 atoms, 1,000 steps in chunks of 100, medians of 8 alternating
# runs: 31.8 / 32.7 / 32.9 ms with 1 / 2 / 3; results/probe_dispatch_h200_2026-11-29_queue-ab).
QUEUED_AHEAD = 1

# One worker, so chunks launch in order and a chunk's input is ready when it starts.
_LAUNCHER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvalchemi-jax-launch")

# JAX settings a caller may have changed for its own thread only (``with jax.enable_x64():``
# and the like), which change what is traced: the worker adopts the caller's.
_THREAD_SETTINGS = {"jax_enable_x64": jax.enable_x64, "jax_default_device": jax.default_device,
                    "jax_default_matmul_precision": jax.default_matmul_precision,
                    "jax_numpy_dtype_promotion": jax.numpy_dtype_promotion,
                    "jax_numpy_rank_promotion": jax.numpy_rank_promotion}


def _in_callers_settings(fn):
    """``fn`` wrapped to run under the calling thread's JAX settings."""
    values = {name: getattr(jax.config, name) for name in _THREAD_SETTINGS}

    def run():
        with contextlib.ExitStack() as stack:
            for name, value in values.items():
                stack.enter_context(_THREAD_SETTINGS[name](value))
            return fn()

    return run


@dataclasses.dataclass
class Chunk:
    """A dispatched chunk: the state it started from, and its (maybe unfinished) results."""

    launched: concurrent.futures.Future
    limit: int              # steps it may take

    @property
    def start(self):
        return self.launched.result()[0]

    @property
    def state(self):
        return self.launched.result()[1]

    @property
    def buffers(self):
        return self.launched.result()[2]

    @property
    def flags(self) -> jax.Array:
        return self.launched.result()[3]

    def settle(self) -> tuple[bool, int, bool]:
        """Wait for the chunk: ``(overflowed, steps taken, any system still active)``."""
        overflow, went, active = (int(x) for x in np.asarray(self.flags))
        return bool(overflow), went, bool(active)


def dispatch(dyn, state, batch, limit: int, length: int, prepare=None, resident: int = 0,
             fused: bool = False, parts: int = 0, grid: int = 0, worker: bool | None = None) -> Chunk:
    """Queue one chunk: the engine's return at once (launched from the worker thread), the
    fused NVE paths' once launched from this thread (``resident`` or ``fused``; ``worker``
    overrides the choice, for timing probes). ``state`` may be
    an earlier :class:`Chunk` (its result), and ``prepare(state) -> state`` (a jitted refill)
    runs first in the same launch. The copies of the records (and of the state's status,
    failures and step) to the host are queued too, ahead of any later chunk, so that handing
    them over never waits for the next chunk."""

    def launch():
        start = state.state if isinstance(state, Chunk) else state
        if prepare is not None:
            start = prepare(start)
        new, (buffers, flags) = run_chunk(dyn, start, batch, limit, length=length, resident=resident,
                                          fused=fused, parts=parts, grid=grid)
        # The run's result fields too: fetched one by one at the end, each was a round trip
        # (~0.3 ms on an H200); copied as every chunk ends, the last chunk's are there at once.
        for leaf in jax.tree.leaves((buffers, flags, new.status, new.failure, new.global_step)):
            leaf.copy_to_host_async()
        return start, new, buffers, flags

    if worker is None:
        worker = not (resident or fused)
    if not worker:
        # The fused chunks read nothing back during their launch, so the worker would save no
        # wait, and handing each launch over to it cost more than it saved (H200, 1,000
        # steps, medians of 8 alternating runs, results/probe_dispatch_h200_2026-11-30_copies:
        # W1 1 x 256 6.32 -> 5.54 ms, W2 32,000 atoms 32.7 -> 31.6 ms, chunks chained by hand
        # with the same copies and waits against the worker's).
        launched = concurrent.futures.Future()
        try:
            launched.set_result(launch())
        except Exception as error:  # noqa: BLE001 - raised where the chunk is waited for
            launched.set_exception(error)
        return Chunk(launched, limit)
    return Chunk(_LAUNCHER.submit(_in_callers_settings(launch)), limit)


def regrown(dyn, start, overflowed, batch):
    """``start`` with a neighbor list large enough for what ``overflowed`` needed, rebuilt at
    the chunk's start (a new shape: one recompilation), so the chunk can be redone. Grown
    again while the rebuilt list still overflows (a truncated build under-reports the
    neighbors per atom). If ``start``'s own list had overflowed (a refill, or a state made
    with a small list), its forces missed pairs: they are computed again."""
    _, nl = neighbors.build_fitting(neighbors.grow(overflowed.neighbors), start.positions,
                                    start.cell, batch, tries=8)
    state = start.replace(neighbors=nl)
    return _recompute(dyn, state, batch) if bool(start.neighbors.overflow) else state


@jax.jit
def _recompute(dyn, state, batch):
    return dyn.compute(state, batch)


def hand_over(observers, buffers) -> None:
    """Give each observer the rows it recorded in a chunk. Every buffer comes over in one
    ``device_get`` (the copies run together); unused rows are cut on the host."""
    if not observers or buffers is None:
        return
    for hook, (rows, steps, count) in zip(observers, jax.device_get(buffers)):
        n = int(count)
        if n:
            records = jax.tree.map(lambda x: x[:n], rows)
            hook.on_host(records, np.ones(n, bool), steps[:n])


def fused_paths(dyn, batch) -> dict:
    """Host side: the static chunk options ``resident``, ``parts``, ``fused`` and ``grid`` of
    :func:`chunk_steps` for this run: resident systems where they qualify (split over
    ``parts`` programs each when few run), else NVE in leapfrog form (in the persistent
    kernel of ``grid`` programs where it runs), else the engine's scan (all 0 / False)."""
    resident = plan_resident(dyn, batch)
    parts = parts_for(batch.num_systems, resident) if resident else 0
    fused = not resident and leapfrog.plan(dyn, batch)
    grid = persistent.programs(batch.num_atoms) if fused else 0
    return dict(resident=resident, parts=parts, fused=fused, grid=grid)


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
    observers = _observers(dyn)
    path = fused_paths(dyn, batch)
    bar = _Progress(max_steps, batch) if progress else None
    taken = chunks = regrows = 0
    try:
        # No host test of whether anything runs first (a sync before the first launch,
        # ~0.6 ms on an H200): a chunk with nothing active takes no step and says so.
        # Chunks are queued QUEUED_AHEAD deep beyond the one the host waits for, each
        # assuming the ones before it take all their steps; `planned` counts those steps.
        pending, planned = collections.deque(), 0
        while True:
            # The chunk settled last is let go first: it holds its start, a whole state on the
            # device, which the launches below would otherwise allocate on top of.
            current = None
            while len(pending) <= QUEUED_AHEAD and planned < max_steps:
                limit = min(chunk_size, max_steps - planned)
                pending.append(dispatch(dyn, pending[-1] if pending else state, batch, limit,
                                        chunk_size, **path))
                planned += limit
            if not pending:
                break
            current = pending.popleft()
            overflowed, went, active = current.settle()
            if went == 0 and not active:
                # Nothing was running (a finished state): the run hands it back as it came,
                # whatever the chunk did on the way (a stale list rebuilt, say).
                break
            chunks += 1
            if overflowed:
                # Drop this chunk and those computed from it; redo from a larger list.
                regrows += 1
                pending.clear()
                pending.append(dispatch(dyn, regrown(dyn, current.start, current.state, batch), batch,
                                        current.limit, chunk_size, **path))
                planned = taken + current.limit
                continue
            taken += went
            state = current.state
            # A chunk that took fewer steps than it could: the queued ones go on from where
            # it stopped (the persistent kernel's rebuilds), or, with nothing left active,
            # did nothing.
            planned -= current.limit - went
            if not active:
                pending.clear()
                planned = max_steps
            # Host work for chunk k while the queued chunks run.
            hand_over(observers, current.buffers)
            if bar is not None:
                bar.update(taken, state, dyn)
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

    def update_samples(self, written, status):
        failed = int((np.asarray(status) == status_codes.FAILED).sum())
        self.bar.update(self.task, completed=written, info=f"{failed} failed in batch")

    def close(self):
        self.bar.stop()
