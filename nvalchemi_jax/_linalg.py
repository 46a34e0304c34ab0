"""Small vector algebra written elementwise.

XLA lowers float32 ``einsum``/``matmul`` on recent NVIDIA GPUs to TF32 by
default (about 3 significant digits); coordinates need full float32, and these
3×3 products are too small to gain from tensor cores anyway.
"""

import jax
import jax.numpy as jnp


def vecmat(v: jax.Array, m: jax.Array) -> jax.Array:
    """Row vectors times matrices: ``v (..., 3) @ m (..., 3, 3) -> (..., 3)`` (broadcasting)."""
    return jnp.sum(v[..., :, None] * m, axis=-2)


def matmul3(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a (..., 3, 3) @ b (..., 3, 3)`` in full precision."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def det3(m: jax.Array) -> jax.Array:
    """Determinants of ``m (..., 3, 3)`` by cofactors (a few fused multiplies; an LU
    decomposition is several library kernels per call on a GPU)."""
    return jnp.sum(m[..., 0, :] * jnp.cross(m[..., 1, :], m[..., 2, :]), axis=-1)


def inv3(m: jax.Array) -> jax.Array:
    """Inverses of ``m (..., 3, 3)`` by cofactors (singular matrices give inf/nan)."""
    a, b, c = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    cols = jnp.stack([jnp.cross(b, c), jnp.cross(c, a), jnp.cross(a, b)], axis=-1)
    return cols / det3(m)[..., None, None]
