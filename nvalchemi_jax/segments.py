"""Per-system reductions over atoms (sum, max, min) that stay fast on a GPU.

``jax.ops.segment_*`` lowers to one atomic update per atom; every atom of a
system hits the same address, so a 256,000-atom system serialises 256,000
atomics (and float max/min have no atomic instruction at all, only
compare-and-swap loops). Atoms of a system mostly sit next to each other, so
these reduce each block of ``BLOCK`` consecutive atoms densely for the system
its first atom belongs to, and scatter only the block results plus the few
atoms that belong to another system (padding and refilled slots included).
Results equal ``jax.ops.segment_*`` (sums up to float rounding order) for any
layout; ids outside ``[0, num_segments)`` are dropped, empty segments get the
identity (0, the dtype's lowest or highest value).

On an H200 (2026-11-29) XLA fused the block reduction into the scatter of the block
results, where each result became one thread reading its block's values in turn
(~6 µs per reduction at 262,144 atoms, and one system's 250 block results at 32,000
atoms all updated one address): the block results are now materialised first, and a
single segment is a plain reduction (with the builds' row-wise shift bounds: W2 +5 to +8 %,
W1 level; results/step_overheads_ab_h200_2026-11-29.jsonl).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128


def _identity(kind: str, dtype):
    if kind == "sum":
        return jnp.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(-jnp.inf if kind == "max" else jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.min if kind == "max" else info.max, dtype)


def _reduce(kind: str, values, ids, num_segments: int):
    ids = jnp.where(ids < 0, num_segments, ids)      # negative ids are dropped, not wrapped
    identity = _identity(kind, values.dtype)
    out = jnp.full((num_segments,) + values.shape[1:], identity, values.dtype)
    scatter = lambda out, idx, v: getattr(out.at[idx], {"sum": "add"}.get(kind, kind))(v, mode="drop")
    n = values.shape[0]
    if num_segments == 1:       # one system (a single large crystal): no scatter at all
        inside = (ids == 0).reshape(ids.shape + (1,) * (values.ndim - 1))
        return getattr(jnp, kind)(jnp.where(inside, values, identity), axis=0, keepdims=True,
                                  initial=identity).astype(values.dtype)
    if n < 2 * BLOCK:
        return scatter(out, ids, values)
    pad = (-n) % BLOCK
    if pad:
        values = jnp.concatenate([values, jnp.full((pad,) + values.shape[1:], identity, values.dtype)])
        ids = jnp.concatenate([ids, jnp.full((pad,), num_segments, ids.dtype)])
    blocks = ids.reshape(-1, BLOCK)
    head = blocks[:, 0]
    same = blocks == head[:, None]
    grouped = values.reshape((-1, BLOCK) + values.shape[1:])
    expand = same.reshape(same.shape + (1,) * (values.ndim - 1))
    # (jnp.sum widens int32 to int64 in x64 mode: back to the values' type for the scatter)
    dense = getattr(jnp, kind)(jnp.where(expand, grouped, identity), axis=1).astype(values.dtype)
    # A kernel of its own, parallel over the blocks' values (see the module's docstring).
    dense, head = jax.lax.optimization_barrier((dense, head))
    out = scatter(out, head, dense)
    strays = jnp.where(same, num_segments, blocks).reshape(-1)   # out of range: dropped
    return scatter(out, strays, values)


def segment_sum(values, ids, num_segments: int):
    """``(num_segments, ...)`` sums of ``values (N, ...)`` by ``ids (N,)``."""
    return _reduce("sum", values, ids, num_segments)


def segment_max(values, ids, num_segments: int):
    return _reduce("max", values, ids, num_segments)


def segment_min(values, ids, num_segments: int):
    return _reduce("min", values, ids, num_segments)
