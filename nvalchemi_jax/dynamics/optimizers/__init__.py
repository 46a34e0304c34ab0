"""Geometry optimizers: FIRE, FIRE2, variable-cell FIRE, and any optax transformation as a
per-system relaxer. All are :class:`~nvalchemi_jax.dynamics.Dynamics`; pass a convergence
hook, e.g. ``ConvergenceHook.from_fmax(0.05)``."""

from nvalchemi_jax.dynamics.optimizers.cell_fire import CellFIRE
from nvalchemi_jax.dynamics.optimizers.fire import FIRE, FIRE2
from nvalchemi_jax.dynamics.optimizers.optax_relaxer import OptaxRelaxer

__all__ = ["FIRE", "FIRE2", "CellFIRE", "OptaxRelaxer"]
