"""nvalchemi_jax: batched molecular dynamics and geometry optimization in JAX."""

from nvalchemi_jax import dynamics, models, neighbors, units
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.capacity import BufferConfig, Capacity

__all__ = ["Batch", "BufferConfig", "Capacity", "dynamics", "models", "neighbors", "units"]
__version__ = "0.1.0"
