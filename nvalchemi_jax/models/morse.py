"""Morse pair potential."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from nvalchemi_jax.models import pair


@struct.dataclass
class Morse(pair.PairPotential):
    """φ(r) = D [e^{−2α(r−r₀)} − 2 e^{−α(r−r₀)}] for r < cutoff (minimum −D at r₀).

    depth D: eV; alpha: 1/Å; r0: Å — scalars or ``(P, P)`` tables over ``species``.
    ASE's ``MorsePotential(epsilon, rho0, r0)`` is ``D = epsilon, alpha = rho0 / r0``.
    shift / switch_on as in :class:`LennardJones`.

    Example::

        >>> cu = Morse(depth=0.3429, alpha=1.3588, r0=2.866, cutoff=6.0, shift=True)
    """

    depth: jnp.ndarray
    alpha: jnp.ndarray
    r0: jnp.ndarray
    cutoff: float = struct.field(pytree_node=False, default=None)
    shift: bool = struct.field(pytree_node=False, default=False)
    switch_on: float | None = struct.field(pytree_node=False, default=None)
    species: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.cutoff is None or not float(self.cutoff) > 0:
            raise ValueError(f"Morse.cutoff must be a positive number of Å, got {self.cutoff}")
        if self.switch_on is not None and not 0 < self.switch_on < self.cutoff:
            raise ValueError(f"Morse.switch_on must lie in (0, cutoff={self.cutoff}), got {self.switch_on}")
        if self.shift and self.switch_on is not None:
            raise ValueError("Morse: choose shift=True or switch_on, not both")
        pair.check_parameters("Morse", self.species, depth=self.depth, alpha=self.alpha, r0=self.r0)

    def check(self, batch) -> None:
        pair.check_species("Morse", self.species, batch)

    def pair_parameters(self):
        return {"depth": self.depth, "alpha": self.alpha, "r0": self.r0}

    def pair_term(self, r2, p):
        depth, alpha, r0 = p["depth"], p["alpha"], p["r0"]

        def morse(r):
            x = jnp.exp(-alpha * (r - r0))
            return depth * (x * x - 2.0 * x)

        e = morse(jnp.sqrt(r2))
        if self.shift:
            e = e - morse(self.cutoff)
        if self.switch_on is not None:
            e = e * pair.smooth_cutoff(r2, self.cutoff, self.switch_on)
        return e
