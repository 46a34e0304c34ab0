"""The first pass of a neighbor-list build as one GPU kernel (Pallas): every candidate of
every row tested, the results packed 32 to a word.

XLA fused this pass badly: with many gathers per candidate it wrote the candidates'
atoms and separations to memory (``(N, candidates)`` arrays, 1.1 GB at 256,000 atoms)
and read them back. Here a program takes ``ROWS`` atoms, loads their per-row values once,
and walks their candidates a word (32) at a time, keeping everything in registers; it
writes only the words. The test itself is the builder's own function
(:class:`~nvalchemi_jax.neighbors._Candidates`), the code XLA runs for the second pass, so
both passes judge a candidate alike.

Used by :func:`~nvalchemi_jax.neighbors._compact` on GPUs; ``NVALCHEMI_JAX_KERNELS=xla``
(:mod:`nvalchemi_jax._pallas`) or ``neighbors.USE_WORD_KERNEL = False`` turn it off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvalchemi_jax import _pallas

ROWS = 32           # atoms per program
NUM_WARPS = 4
WORD = 32


def words(cand, n_atoms: int, n_words: int, interpret: bool | None = None) -> jax.Array:
    """``(N, n_words) uint32``: bit ``b`` of word ``w`` of row ``i`` tells whether candidate
    ``32 w + b`` of atom ``i`` is accepted by ``cand.test``."""
    row_names, table_names = tuple(cand.rows), tuple(cand.tables)
    interpret = _pallas.interpreted(interpret)
    extra = _pallas.spare(interpret)      # masked-out lanes go to the entry past the end
    kernel = functools.partial(_kernel, row_names=row_names, table_names=table_names,
                               test=cand.test, n=n_atoms, n_words=n_words)
    call = _pallas.call(kernel, [jax.ShapeDtypeStruct((n_atoms * n_words + extra,), jnp.uint32)],
                        -(-n_atoms // ROWS), NUM_WARPS, "neighbor_words", interpret)
    out, = call(*[cand.rows[k] for k in row_names], *[cand.tables[k] for k in table_names])
    return out[:n_atoms * n_words].reshape(n_atoms, n_words)


def _kernel(*refs, row_names, table_names, test, n, n_words):
    from jax.experimental import pallas as pl
    row_refs = refs[:len(row_names)]
    tables = dict(zip(table_names, refs[len(row_names):len(row_names) + len(table_names)]))
    out_ref = refs[-1]
    i = pl.program_id(0) * ROWS + jnp.arange(ROWS, dtype=jnp.int32)
    live = i < n
    i = jnp.where(live, i, 0)
    rows = {name: ref[i][:, None] for name, ref in zip(row_names, row_refs)}
    take = lambda name, index: tables[name][index]
    lane = jnp.arange(WORD, dtype=jnp.int32)[None, :]
    bit = lane.astype(jnp.uint32)

    def word(w, carry):
        m = jnp.broadcast_to(w * WORD + lane, (ROWS, WORD))
        _, _, ok = test(rows, take, m)
        packed = jnp.sum(ok.astype(jnp.uint32) << bit, axis=1)      # distinct bits: sum = or
        _pallas.store(out_ref, jnp.where(live, i * n_words + w, n * n_words), packed, live)
        return carry

    jax.lax.fori_loop(0, n_words, word, 0)
