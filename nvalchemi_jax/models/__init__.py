"""Interatomic potentials and the model contract (see :mod:`nvalchemi_jax.models.base`)."""

from nvalchemi_jax.models.base import Model, ModelOutput, compute, volume
from nvalchemi_jax.models.flax_model import AtomGraph, FlaxModel
from nvalchemi_jax.models.lennard_jones import LennardJones
from nvalchemi_jax.models.morse import Morse
from nvalchemi_jax.models.soft_sphere import SoftSphere
from nvalchemi_jax.models.sum import SumModel

__all__ = ["AtomGraph", "FlaxModel", "LennardJones", "Model", "ModelOutput", "Morse",
           "SoftSphere", "SumModel", "compute", "volume"]
