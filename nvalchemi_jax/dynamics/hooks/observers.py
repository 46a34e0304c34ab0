"""Observer hooks: they keep records on the device at due steps and act on the host
between chunks (never a device→host sync per step). Each keeps what it saw for inspection."""

from __future__ import annotations

import csv
import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.convergence import reduce_atoms
from nvalchemi_jax.dynamics.hooks.base import Hook, Stage
from nvalchemi_jax.dynamics.thermo import kinetic_energy, temperature
from nvalchemi_jax.frames import Frames


def _per_system_summary(state, batch):
    fmax = reduce_atoms(jnp.linalg.norm(state.forces, axis=-1), batch, "max")
    n = jnp.maximum(batch.n_atoms, 1)
    return {"sample_id": batch.sample_id, "n_atoms": batch.n_atoms, "energy_per_atom": state.energy / n,
            "fmax": jnp.where(batch.system_mask, fmax, 0.0),
            "temperature": temperature(state.velocities, batch),
            "status": state.status, "step": state.step}


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class LoggingHook(Hook):
    """Log per-system energy per atom, fmax, temperature, status, and the converged fraction.

    output: ``"console"`` (a rich table of the latest record after each chunk),
    a path ending in ``.csv`` (one row per system per logged step, appended), or a
    callable ``(rows: list[dict]) -> None``. ``rows`` keeps everything logged.
    """

    frequency: int = 100
    output: object = "console"
    max_rows: int = 20
    rows: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        object.__setattr__(self, "record", lambda s, b, ctx: _per_system_summary(s, b))
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()

    def _on_host(self, records, due, steps):
        new_rows = []
        names = ("sample_id", "n_atoms", "energy_per_atom", "fmax", "temperature", "status", "step")
        for t in np.flatnonzero(due):
            live = records["sample_id"][t] >= 0
            # Whole columns to Python at once (per-element conversions cost ~10 ms per
            # 1,000 systems, and this runs between chunks).
            columns = [records[k][t][live].tolist() for k in names]
            step = int(steps[t])
            new_rows += [{"step": step, "sample_id": i, "n_atoms": n, "energy_per_atom": e, "fmax": f,
                          "temperature": temp, "status": st, "system_step": k}
                         for i, n, e, f, temp, st, k in zip(*columns)]
        if not new_rows:
            return
        self.rows.extend(new_rows)
        if callable(self.output):
            self.output(new_rows)
        elif isinstance(self.output, (str, os.PathLike)) and os.fspath(self.output).endswith(".csv"):
            path = os.fspath(self.output)
            write_header = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(new_rows[0]))
                if write_header:
                    writer.writeheader()
                writer.writerows(new_rows)
        elif self.output == "console":
            self._print(new_rows)
        else:
            raise ValueError(f"LoggingHook.output must be 'console', a .csv path or a callable, got {self.output!r}")

    def _print(self, rows):
        from rich.console import Console
        from rich.table import Table

        last = max(r["step"] for r in rows)
        latest = [r for r in rows if r["step"] == last]
        done = sum(r["status"] != 0 for r in latest)
        table = Table(title=f"step {last}: {len(latest)} systems, {done} past their first stage")
        for col in ("sample", "atoms", "E/atom (eV)", "fmax (eV/Å)", "T (K)", "status"):
            table.add_column(col, justify="right")
        for r in latest[: self.max_rows]:
            table.add_row(str(r["sample_id"]), str(r["n_atoms"]), f"{r['energy_per_atom']:.5f}",
                          f"{r['fmax']:.4f}", f"{r['temperature']:.1f}", str(r["status"]))
        Console().print(table)


def _frame_record(state, batch):
    return {"positions": state.positions, "velocities": state.velocities, "forces": state.forces,
            "cell": state.cell, "energy": state.energy, "stress": state.stress, "status": state.status,
            "failure": state.failure, "step": state.step}


def _frames_from_record(rec, batch_host, systems) -> Frames:
    class _S:  # a state-like view of one recorded step
        pass
    view = _S()
    for k, v in rec.items():
        setattr(view, k, v)
    return Frames.from_state(view, batch_host, systems)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SnapshotHook(Hook):
    """Every ``frequency`` steps, write every filled system's frame to ``sink`` (any sink).
    The recorded arrays are per step of a chunk: memory is ``chunk_size × N`` frames' worth."""

    sink: object = None
    frequency: int = 100

    def __post_init__(self):
        if self.sink is None:
            raise ValueError("SnapshotHook needs a sink")
        object.__setattr__(self, "record", lambda s, b, ctx: {**_frame_record(s, b), **_batch_record(b)})
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()

    def _on_host(self, records, due, steps):
        for t in np.flatnonzero(due):
            rec = {k: v[t] for k, v in records.items()}
            frames = _frames_from_record(rec, _BatchView(rec), rec["system_mask"])
            taken = self.sink.write(frames)
            if taken < len(frames):
                raise RuntimeError(f"SnapshotHook: the sink is full ({taken} of {len(frames)} frames written)")


def _batch_record(batch):
    return {"atomic_numbers": batch.atomic_numbers, "masses": batch.masses, "fixed": batch.fixed,
            "tags": batch.tags, "charges": batch.charges, "pbc": batch.pbc, "sample_id": batch.sample_id,
            "system_index": batch.system_index, "system_mask": batch.system_mask}


class _BatchView:
    """The parts of a batch that :meth:`Frames.from_state` reads, from a host record."""

    def __init__(self, rec):
        for k in ("atomic_numbers", "masses", "fixed", "tags", "charges", "pbc", "sample_id", "system_index"):
            setattr(self, k, rec[k])
        self.num_systems = len(rec["sample_id"])


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ConvergedSnapshotHook(Hook):
    """Write each system's frame to ``sink`` in the step it converges (leaves its stage)."""

    sink: object = None

    def __post_init__(self):
        if self.sink is None:
            raise ValueError("ConvergedSnapshotHook needs a sink")
        object.__setattr__(self, "record", self._record)
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()

    @staticmethod
    def _record(state, batch, ctx):
        return {**_frame_record(state, batch), **_batch_record(batch), "converged": ctx.converged}

    def _on_host(self, records, due, steps):
        for t in np.flatnonzero(due & records["converged"].any(axis=1)):
            rec = {k: v[t] for k, v in records.items()}
            frames = _frames_from_record(rec, _BatchView(rec), rec["converged"])
            if self.sink.write(frames) < len(frames):
                raise RuntimeError("ConvergedSnapshotHook: the sink is full")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class EnergyDriftMonitorHook(Hook):
    """Track each sample's total energy (potential + kinetic) against its first logged value.

    Keyed by sample id, so it survives refills (a slot's new system starts a new record).
    ``drifts`` maps sample id to the latest relative drift |E − E0| / |E0|; with
    ``threshold`` set, a larger drift warns (``action="warn"``) or raises (``"raise"``).
    """

    frequency: int = 100
    threshold: float | None = None
    action: str = "warn"
    reference: dict = dataclasses.field(default_factory=dict)
    drifts: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.action not in ("warn", "raise"):
            raise ValueError(f"EnergyDriftMonitorHook.action must be 'warn' or 'raise', got {self.action!r}")
        record = lambda s, b, ctx: {"sample_id": b.sample_id, "status": s.status,
                                    "total": s.energy + kinetic_energy(s.velocities, b)}
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()

    def _on_host(self, records, due, steps):
        for t in np.flatnonzero(due):
            for sid, st, e in zip(records["sample_id"][t], records["status"][t], records["total"][t]):
                if sid < 0 or st == status_codes.FAILED:
                    continue
                e0 = self.reference.setdefault(int(sid), float(e))
                drift = abs(float(e) - e0) / max(abs(e0), 1e-30)
                self.drifts[int(sid)] = drift
                if self.threshold is not None and drift > self.threshold:
                    message = f"sample {int(sid)}: relative energy drift {drift:.3g} > {self.threshold}"
                    if self.action == "raise":
                        raise RuntimeError(message)
                    warnings.warn(message, stacklevel=2)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class NaNDetectorHook(Hook):
    """Report systems that failed on non-finite numbers (the engine already freezes them).

    action: ``"raise"`` stops the run at the end of the chunk with the systems, sample
    ids and reasons; ``"quarantine"`` lets the run continue and keeps the reports in
    ``failures`` (sample id -> message).
    """

    action: str = "quarantine"
    frequency: int = 1
    failures: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.action not in ("raise", "quarantine"):
            raise ValueError(f"NaNDetectorHook.action must be 'raise' or 'quarantine', got {self.action!r}")
        record = lambda s, b, ctx: {"sample_id": b.sample_id, "failure": s.failure,
                                    "failed": s.status == status_codes.FAILED}
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()

    def _on_host(self, records, due, steps):
        last = np.flatnonzero(due)
        if not len(last):
            return
        t = last[-1]
        new = {}
        for sid, reason, bad in zip(records["sample_id"][t], records["failure"][t], records["failed"][t]):
            if bad and sid >= 0 and int(sid) not in self.failures:
                new[int(sid)] = status_codes.message(reason)
        self.failures.update(new)
        if new and self.action == "raise":
            details = "; ".join(f"sample {k}: {v}" for k, v in new.items())
            raise FloatingPointError(f"non-finite values at or before step {int(steps[t])}: {details}")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ProfilerHook(Hook):
    """Wall time per chunk (``chunk_seconds``) and, with ``trace_dir``, a ``jax.profiler``
    trace of the chunks. :meth:`stage_timings` times one step's phases separately."""

    trace_dir: str | None = None
    chunk_seconds: list = dataclasses.field(default_factory=list)
    _clock: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        object.__setattr__(self, "record", lambda s, b, ctx: {"step": s.global_step})
        object.__setattr__(self, "on_host", self._on_host)
        super().__post_init__()
        if self.trace_dir is not None:
            jax.profiler.start_trace(self.trace_dir)
        self._clock.append(time.perf_counter())

    def _on_host(self, records, due, steps):
        now = time.perf_counter()
        self.chunk_seconds.append(now - self._clock[-1])
        self._clock.append(now)

    def stop(self) -> None:
        """End the profiler trace (if one was started)."""
        if self.trace_dir is not None:
            jax.profiler.stop_trace()

    @staticmethod
    def stage_timings(dyn, state, batch, repeats: int = 10) -> dict:
        """Seconds per call of pre_update, compute and post_update (each compiled alone)."""
        out = {}
        for name, fn in (("pre_update", dyn.pre_update), ("compute", dyn.compute),
                         ("post_update", dyn.post_update)):
            f = jax.jit(fn)
            jax.block_until_ready(f(state, batch))
            t0 = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(f(state, batch))
            out[name] = (time.perf_counter() - t0) / repeats
        return out
