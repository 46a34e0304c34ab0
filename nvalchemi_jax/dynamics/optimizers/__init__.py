"""Geometry optimizers: FIRE, FIRE2, variable-cell FIRE, and any optax transformation."""

from nvalchemi_jax.dynamics.optimizers.cell_fire import CellFIRE
from nvalchemi_jax.dynamics.optimizers.fire import FIRE, FIRE2

__all__ = ["FIRE", "FIRE2", "CellFIRE"]
