"""Sinks: where finished systems go. All share ``write, read, len, capacity, is_full, drain``.

``write(frames)`` stores as many frames as fit and returns how many it took;
the caller offers the rest to the next sink (:func:`write_all`), so a full sink
never drops data. ``read()`` returns everything stored (a :class:`Frames`),
``drain()`` returns it and empties the sink.

* :class:`HostMemory` — frames in host RAM.
* :class:`GPUBuffer` — a device-resident ring of fixed-size slots (frames stay
  on the accelerator until drained; writing from a running state needs no
  device→host copy).
* :class:`ZarrData` — a zarr v3 store on disk in the ragged layout (flat per-atom
  arrays plus ``offsets``), appendable across runs and readable with plain zarr.
"""

from __future__ import annotations

import abc
import os

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import neighbors
from nvalchemi_jax.frames import ATOM_FIELDS, FRAME_FIELDS, Frames


class Sink(abc.ABC):
    #: Maximum number of frames held (``None``: unbounded).
    capacity: int | None = None

    @abc.abstractmethod
    def write(self, frames: Frames) -> int:
        """Store up to the free capacity; return the number of frames taken (a prefix)."""

    @abc.abstractmethod
    def read(self) -> Frames:
        """Everything stored, in write order."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def clear(self) -> None: ...

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - len(self)

    @property
    def is_full(self) -> bool:
        return self.capacity is not None and len(self) >= self.capacity

    def drain(self) -> Frames:
        """Read everything and empty the sink."""
        frames = self.read()
        self.clear()
        return frames


def write_all(frames: Frames, sinks) -> Frames:
    """Offer ``frames`` to each sink in priority order; return what none could take
    (empty when all were stored)."""
    for sink in sinks:
        if not len(frames):
            break
        taken = sink.write(frames)
        frames = frames.select(slice(taken, None))
    return frames


class HostMemory(Sink):
    """Frames kept in host memory. capacity: frames (``None`` = unbounded).

    Example::

        sink = HostMemory(capacity=10_000)
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 0:
            raise ValueError(f"HostMemory.capacity must be >= 0 or None, got {capacity}")
        self.capacity = capacity
        self._parts: list[Frames] = []
        self._count = 0

    def write(self, frames: Frames) -> int:
        n = len(frames) if self.free is None else min(len(frames), self.free)
        if n:
            self._parts.append(frames.select(slice(0, n)))
            self._count += n
        return n

    def read(self) -> Frames:
        return Frames.concatenate(self._parts) if self._parts else Frames.empty()

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._parts, self._count = [], 0


class GPUBuffer(Sink):
    """A device ring of ``capacity`` frame slots of up to ``max_atoms`` atoms each.

    ``write`` accepts host :class:`Frames`; :meth:`write_from_state` copies
    systems straight from a running state on the device. ``read`` brings the
    stored frames to the host.

    Example::

        buffer = GPUBuffer(capacity=1024, max_atoms=500)
    """

    def __init__(self, capacity: int, max_atoms: int, dtype=None):
        if capacity < 1 or max_atoms < 1:
            raise ValueError(f"GPUBuffer needs capacity >= 1 and max_atoms >= 1, got {capacity}, {max_atoms}")
        self.capacity, self.max_atoms = int(capacity), int(max_atoms)
        dtype = dtype or jnp.zeros((), float).dtype
        c, a = self.capacity, self.max_atoms
        self._atoms = {"positions": jnp.zeros((c, a, 3), dtype), "velocities": jnp.zeros((c, a, 3), dtype),
                       "forces": jnp.zeros((c, a, 3), dtype), "atomic_numbers": jnp.zeros((c, a), jnp.int32),
                       "masses": jnp.zeros((c, a), dtype), "fixed": jnp.zeros((c, a), bool),
                       "tags": jnp.zeros((c, a), jnp.int32), "charges": jnp.zeros((c, a), dtype)}
        self._frames = {"cell": jnp.zeros((c, 3, 3), dtype), "pbc": jnp.zeros((c, 3), bool),
                        "energy": jnp.zeros(c, dtype), "stress": jnp.zeros((c, 3, 3), dtype),
                        "sample_id": jnp.zeros(c, jnp.int32), "status": jnp.zeros(c, jnp.int32),
                        "failure": jnp.zeros(c, jnp.int32), "step": jnp.zeros(c, jnp.int32),
                        "n_atoms": jnp.zeros(c, jnp.int32)}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._count = 0

    def write(self, frames: Frames) -> int:
        n = min(len(frames), self.free)
        if n == 0:
            return 0
        too_big = np.flatnonzero(frames.n_atoms[:n] > self.max_atoms)
        if too_big.size:
            raise ValueError(f"GPUBuffer: frame of sample_id {int(frames.sample_id[too_big[0]])} has "
                             f"{int(frames.n_atoms[too_big[0]])} atoms > max_atoms = {self.max_atoms}")
        part = frames.select(slice(0, n))
        counts = part.n_atoms
        rows = np.repeat(np.arange(n), counts)
        cols = np.arange(part.offsets[-1]) - np.repeat(part.offsets[:-1], counts)
        slots = self._count + np.arange(n)
        for f in ATOM_FIELDS:
            block = np.zeros((n, self.max_atoms) + getattr(part, f).shape[1:], getattr(part, f).dtype)
            block[rows, cols] = getattr(part, f)
            self._atoms[f] = self._atoms[f].at[slots].set(jnp.asarray(block, self._atoms[f].dtype))
        for f in FRAME_FIELDS:
            self._frames[f] = self._frames[f].at[slots].set(jnp.asarray(getattr(part, f), self._frames[f].dtype))
        self._frames["n_atoms"] = self._frames["n_atoms"].at[slots].set(jnp.asarray(counts, jnp.int32))
        self._count += n
        return n

    def write_from_state(self, state, batch, systems) -> int:
        """Copy the systems selected by ``systems (S,) bool`` from a state, on the device.
        Returns how many were stored (a prefix in slot order); no host copy of atoms."""
        slots_wanted = np.flatnonzero(np.asarray(systems))
        n = min(len(slots_wanted), self.free)
        if n == 0:
            return 0
        src = jnp.asarray(slots_wanted[:n], jnp.int32)
        dst = jnp.asarray(self._count + np.arange(n), jnp.int32)
        self._atoms, self._frames = _gather_into(self._atoms, self._frames, state, batch, src, dst,
                                                 self.max_atoms)
        self._count += n
        return n

    def read(self) -> Frames:
        n = self._count
        if n == 0:
            return Frames.empty()
        counts = np.asarray(self._frames["n_atoms"][:n])
        if counts.max(initial=0) > self.max_atoms:
            raise ValueError("GPUBuffer: a system larger than max_atoms was written from a state")
        valid = np.arange(self.max_atoms)[None, :] < counts[:, None]
        atoms = {f: np.asarray(v[:n])[valid] for f, v in self._atoms.items()}
        frames = {f: np.asarray(self._frames[f][:n]) for f in FRAME_FIELDS}
        frames["sample_id"] = frames["sample_id"].astype(np.int64)
        frames["step"] = frames["step"].astype(np.int64)
        return Frames(**atoms, **frames, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


@jax.jit
def _gather_into(atoms, frames, state, batch, src, dst, max_atoms):
    # Each selected system's atoms, in index order, into rows of the buffer.
    n_atoms = batch.num_atoms
    order, first, _ = neighbors.system_segments(batch)
    start = first[src]
    cols = jnp.arange(atoms["positions"].shape[1])
    take = order[jnp.clip(start[:, None] + cols[None, :], 0, n_atoms - 1)]
    valid = cols[None, :] < batch.n_atoms[src][:, None]
    sources = {"positions": state.positions, "velocities": state.velocities, "forces": state.forces,
               "atomic_numbers": batch.atomic_numbers, "masses": batch.masses, "fixed": batch.fixed,
               "tags": batch.tags, "charges": batch.charges}
    out_atoms = {}
    for f, buf in atoms.items():
        v = sources[f][take]
        mask = valid.reshape(valid.shape + (1,) * (v.ndim - 2))
        out_atoms[f] = buf.at[dst].set(jnp.where(mask, v, 0).astype(buf.dtype))
    per_frame = {"cell": state.cell, "pbc": batch.pbc, "energy": state.energy, "stress": state.stress,
                 "sample_id": batch.sample_id, "status": state.status, "failure": state.failure,
                 "step": state.step, "n_atoms": batch.n_atoms}
    out_frames = {f: buf.at[dst].set(per_frame[f][src].astype(buf.dtype)) for f, buf in frames.items()}
    return out_atoms, out_frames


class ZarrData(Sink):
    """Frames in a zarr v3 group on disk: one array per field, per-atom arrays flat
    ``(A, ...)``, per-frame arrays ``(F, ...)``, and ``offsets (F + 1,) int64``.

    Writes are buffered in memory and appended in blocks of ``buffer_frames``
    (each zarr append costs a metadata update), so call :meth:`flush` (or
    :meth:`read`, or use the sink as a context manager) before reading the store
    elsewhere. Opening an existing store appends to it. ``compressors`` and
    ``chunk_atoms`` / ``chunk_frames`` are passed to zarr.

    Read it back without this library::

        g = zarr.open_group("run.zarr", mode="r")
        o = g["offsets"][:]
        frame_7_positions = g["positions"][o[7]:o[8]]
    """

    FORMAT = "nvalchemi_jax.frames"

    def __init__(self, path: str | os.PathLike, capacity: int | None = None, buffer_frames: int = 256,
                 chunk_atoms: int = 65_536, chunk_frames: int = 4096, compressors="auto"):
        import zarr

        self.path = os.fspath(path)
        self.capacity = capacity
        self.buffer_frames = int(buffer_frames)
        self._pending: list[Frames] = []
        self._pending_count = 0
        self._chunks = (int(chunk_atoms), int(chunk_frames))
        self._compressors = compressors
        exists = os.path.exists(os.path.join(self.path, "zarr.json"))
        self._group = zarr.open_group(self.path, mode="a")
        if exists and self._group.attrs.get("format") != self.FORMAT:
            raise ValueError(f"ZarrData: {self.path} exists but is not a {self.FORMAT} store")
        self._stored = self._group["sample_id"].shape[0] if "sample_id" in self._group else 0

    def _create(self, frames: Frames) -> None:
        g = self._group
        g.attrs.update({"format": self.FORMAT, "version": 1,
                        "float_dtype": str(frames.positions.dtype),
                        "units": {"positions": "Å", "velocities": "Å/fs", "forces": "eV/Å", "energy": "eV",
                                  "stress": "eV/Å³", "cell": "Å", "masses": "amu"}})
        for f in ATOM_FIELDS + FRAME_FIELDS:
            x = getattr(frames, f)
            chunk = self._chunks[0] if f in ATOM_FIELDS else self._chunks[1]
            g.create_array(f, shape=(0,) + x.shape[1:], chunks=(chunk,) + x.shape[1:], dtype=x.dtype,
                           compressors=self._compressors)
        g.create_array("offsets", data=np.zeros(1, np.int64), chunks=(self._chunks[1],),
                       compressors=self._compressors)

    def __len__(self) -> int:
        return self._stored + self._pending_count

    def write(self, frames: Frames) -> int:
        n = len(frames) if self.free is None else min(len(frames), self.free)
        if n:
            self._pending.append(frames.select(slice(0, n)))
            self._pending_count += n
            if self._pending_count >= self.buffer_frames:
                self.flush()
        return n

    def flush(self) -> None:
        """Append the buffered frames to the store."""
        if not self._pending:
            return
        frames = Frames.concatenate(self._pending)
        if "sample_id" not in self._group:
            self._create(frames)
        stored_dtype = np.dtype(self._group.attrs["float_dtype"])
        if frames.positions.dtype != stored_dtype:
            raise ValueError(f"ZarrData: the store at {self.path} holds {stored_dtype} but these frames are "
                             f"{frames.positions.dtype}; write to a new store or convert")
        g = self._group
        for f in ATOM_FIELDS + FRAME_FIELDS:
            g[f].append(getattr(frames, f), axis=0)
        last = int(g["offsets"][-1])
        g["offsets"].append(frames.offsets[1:] + last, axis=0)
        self._stored += len(frames)
        self._pending, self._pending_count = [], 0

    def read(self) -> Frames:
        self.flush()
        if "sample_id" not in self._group:
            return Frames.empty()
        return read_zarr(self.path)

    def clear(self) -> None:
        import zarr

        self._pending, self._pending_count = [], 0
        self._group = zarr.open_group(self.path, mode="w")
        self._stored = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_zarr(path: str | os.PathLike) -> Frames:
    """Read a :class:`ZarrData` store into :class:`Frames` (whole arrays, no per-frame loop)."""
    import zarr

    g = zarr.open_group(os.fspath(path), mode="r")
    fields = {f: g[f][:] for f in ATOM_FIELDS + FRAME_FIELDS}
    return Frames(**fields, offsets=g["offsets"][:].astype(np.int64))
