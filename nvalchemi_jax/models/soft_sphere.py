"""Soft-sphere repulsion (a common model for jammed packings and overlap removal)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax.models import pair


@struct.dataclass
class SoftSphere(pair.PairPotential):
    """φ(r) = (ε/α) (1 − r/σ)^α for r < σ, zero beyond; purely repulsive.

    sigma: contact distance in Å (the cutoff defaults to the largest σ); epsilon: eV;
    alpha: stiffness exponent (2 = harmonic). ``(P, P)`` tables over ``species``
    are allowed for sigma and epsilon.

    Example::

        >>> SoftSphere(sigma=2.0, epsilon=1.0)
    """

    sigma: jnp.ndarray
    epsilon: jnp.ndarray
    alpha: float = struct.field(pytree_node=False, default=2.0)
    species: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        pair.check_parameters("SoftSphere", self.species, sigma=self.sigma, epsilon=self.epsilon)
        if self.cutoff is None:   # the largest contact distance; fixed when built
            object.__setattr__(self, "cutoff", float(np.max(np.asarray(self.sigma))))
        if not self.alpha >= 1:
            raise ValueError(f"SoftSphere.alpha must be >= 1, got {self.alpha}")

    cutoff: float | None = struct.field(pytree_node=False, default=None)

    def check(self, batch) -> None:
        """Host side: parameters for every element, and no σ beyond the cutoff fixed at build time."""
        pair.check_species("SoftSphere", self.species, batch)
        largest = float(np.max(np.asarray(self.sigma)))
        if largest > self.cutoff:
            raise ValueError(f"SoftSphere: largest sigma {largest} Å exceeds the cutoff {self.cutoff} Å "
                             "fixed when the model was built; build a new model for the new sigma")

    def pair_parameters(self):
        return {"sigma": self.sigma, "epsilon": self.epsilon}

    def pair_term(self, r2, p):
        overlap = jnp.maximum(1.0 - jnp.sqrt(r2) / p["sigma"], 0.0)
        return p["epsilon"] / self.alpha * overlap**self.alpha
