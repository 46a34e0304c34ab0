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
