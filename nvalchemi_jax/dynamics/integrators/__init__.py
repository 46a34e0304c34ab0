"""Molecular-dynamics integrators."""

from nvalchemi_jax.dynamics.integrators.nve import NVE

__all__ = ["NVE"]
