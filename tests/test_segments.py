"""Blocked per-system reductions against ``jax.ops.segment_*`` (an independent implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvalchemi_jax import segments


def layouts(rng, n, s):
    """Sorted ids (the usual batch), sorted with strays (refilled slots), and shuffled."""
    ordered = np.sort(rng.integers(0, s + 1, n))          # id s = padding, dropped
    strays = ordered.copy()
    strays[rng.choice(n, size=max(1, n // 20), replace=False)] = rng.integers(0, s + 1, max(1, n // 20))
    return {"sorted": ordered, "strays": strays, "shuffled": rng.permutation(ordered)}


@pytest.mark.parametrize("n, s", [(100, 3), (300, 1), (1000, 7), (4099, 40), (1024, 1024)])
@pytest.mark.parametrize("kind", ["sum", "max", "min"])
def test_matches_jax_ops(x64, n, s, kind):
    rng = np.random.default_rng(n + s)
    ours, ref = getattr(segments, f"segment_{kind}"), getattr(jax.ops, f"segment_{kind}")
    for name, ids in layouts(rng, n, s).items():
        ids = jnp.asarray(ids, jnp.int32)
        for values in (rng.normal(size=n), rng.normal(size=(n, 3)), rng.integers(-9, 9, n).astype(np.int32)):
            if kind == "sum" and values.dtype == np.int32:
                continue
            got, want = ours(jnp.asarray(values), ids, s), ref(jnp.asarray(values), ids, s)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12,
                                       err_msg=f"{kind} {name} {values.shape} {values.dtype}")


def test_ids_out_of_range_are_dropped(x64):
    ids = jnp.asarray(np.r_[np.zeros(290, int), -1 * np.ones(5, int), 3 * np.ones(5, int)], jnp.int32)
    np.testing.assert_array_equal(segments.segment_sum(jnp.ones(300), ids, 3), [290.0, 0.0, 0.0])
    np.testing.assert_array_equal(segments.segment_sum(jnp.ones(10), ids[285:295], 3), [5.0, 0.0, 0.0])


def test_empty_segments_get_the_identity(x64):
    ids = jnp.zeros(300, jnp.int32)                       # every atom in system 0 of 3
    v = jnp.ones(300)
    np.testing.assert_array_equal(segments.segment_sum(v, ids, 3), [300.0, 0.0, 0.0])
    assert np.asarray(segments.segment_max(v, ids, 3))[1] == -np.inf
    assert np.asarray(segments.segment_min(v, ids, 3))[2] == np.inf


def test_sum_is_differentiable(x64):
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 5, 700)), jnp.int32)
    w = jnp.arange(5.0)
    grad = jax.grad(lambda v: jnp.sum(w * segments.segment_sum(v, ids, 5)))(jnp.ones(700))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w)[np.asarray(ids)])
