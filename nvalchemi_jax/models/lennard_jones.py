"""Lennard-Jones pair potential with per-species-pair parameters."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax.models import pair


@struct.dataclass
class LennardJones(pair.PairPotential):
    """φ(r) = 4 ε [(σ/r)¹² − (σ/r)⁶] for r < cutoff.

    sigma: Å and epsilon: eV, scalars or ``(P, P)`` symmetric tables over ``species``
    (atomic numbers, e.g. ``(18, 36)``; see :meth:`mixed` for Lorentz–Berthelot).
    cutoff: Å. shift: subtract φ(cutoff) so the energy is continuous (ASE's
    ``LennardJones(smooth=False)``). switch_on: if set, multiply by ASE's C¹
    switching function between ``switch_on`` and ``cutoff`` (ASE's
    ``smooth=True, ro=switch_on``); energy and forces then vanish smoothly.

    Example::

        >>> lj = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5)   # argon
    """

    sigma: jnp.ndarray
    epsilon: jnp.ndarray
    cutoff: float = struct.field(pytree_node=False, default=None)
    shift: bool = struct.field(pytree_node=False, default=False)
    switch_on: float | None = struct.field(pytree_node=False, default=None)
    species: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.cutoff is None or not float(self.cutoff) > 0:
            raise ValueError(f"LennardJones.cutoff must be a positive number of Å, got {self.cutoff}")
        if self.switch_on is not None and not 0 < self.switch_on < self.cutoff:
            raise ValueError(f"LennardJones.switch_on must lie in (0, cutoff={self.cutoff}), "
                             f"got {self.switch_on}")
        if self.shift and self.switch_on is not None:
            raise ValueError("LennardJones: choose shift=True or switch_on, not both")
        pair.check_parameters("LennardJones", self.species, sigma=self.sigma, epsilon=self.epsilon)

    @classmethod
    def mixed(cls, species: Sequence[int], sigma: Sequence[float], epsilon: Sequence[float],
              cutoff: float, **kwargs) -> "LennardJones":
        """Per-species σ_i, ε_i combined by Lorentz–Berthelot: σ_ij = (σ_i+σ_j)/2, ε_ij = √(ε_i ε_j)."""
        s, e = np.asarray(sigma, float), np.asarray(epsilon, float)
        return cls(sigma=(s[:, None] + s[None, :]) / 2, epsilon=np.sqrt(e[:, None] * e[None, :]),
                   cutoff=cutoff, species=tuple(int(z) for z in species), **kwargs)

    def check(self, batch) -> None:
        """Host side: every element of ``batch`` has parameters."""
        pair.check_species("LennardJones", self.species, batch)

    def pair_parameters(self):
        return {"sigma": self.sigma, "epsilon": self.epsilon}

    def pair_term(self, r2, p):
        sigma, epsilon = p["sigma"], p["epsilon"]
        s6 = (sigma * sigma / r2) ** 3
        e = 4.0 * epsilon * (s6 * s6 - s6)
        if self.shift:
            c6 = (sigma * sigma / self.cutoff**2) ** 3
            e = e - 4.0 * epsilon * (c6 * c6 - c6)
        if self.switch_on is not None:
            e = e * pair.smooth_cutoff(r2, self.cutoff, self.switch_on)
        return e
