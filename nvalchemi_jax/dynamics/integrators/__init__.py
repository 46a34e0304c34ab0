"""Molecular-dynamics integrators: NVE, NVT (Langevin BAOAB, Nosé–Hoover chains), NPT/NPH (MTK)."""

from nvalchemi_jax.dynamics.integrators.langevin import NVTLangevin
from nvalchemi_jax.dynamics.integrators.nose_hoover import NVTNoseHoover
from nvalchemi_jax.dynamics.integrators.npt import NPH, NPT
from nvalchemi_jax.dynamics.integrators.nve import NVE

__all__ = ["NPH", "NPT", "NVE", "NVTLangevin", "NVTNoseHoover"]
