"""Dynamics: pure steps, compiled run loops, hooks and convergence (see :mod:`.base`),
integrators, optimizers, fused stages (``a + b``), inflight batching and sinks."""

from nvalchemi_jax.dynamics import status
from nvalchemi_jax.dynamics.base import Dynamics, RunResult, StageState, State
from nvalchemi_jax.dynamics.convergence import ConvergenceHook, Criterion
from nvalchemi_jax.dynamics.fused import FusedStage
from nvalchemi_jax.dynamics.hooks import Hook, HookContext, Stage
from nvalchemi_jax.dynamics.integrators import NPH, NPT, NVE, NVTLangevin, NVTNoseHoover
from nvalchemi_jax.dynamics.optimizers import FIRE, FIRE2, CellFIRE, OptaxRelaxer
from nvalchemi_jax.dynamics.run import CHUNK_COMPILER_OPTIONS
from nvalchemi_jax.dynamics.sampler import SizeAwareSampler
from nvalchemi_jax.dynamics.sinks import GPUBuffer, HostMemory, ZarrData
from nvalchemi_jax.dynamics.thermo import kinetic_energy, maxwell_boltzmann, temperature

__all__ = ["CHUNK_COMPILER_OPTIONS", "FIRE", "FIRE2", "NPH", "NPT", "NVE", "CellFIRE", "ConvergenceHook",
           "Criterion", "Dynamics", "FusedStage", "GPUBuffer", "Hook", "HookContext", "HostMemory",
           "NVTLangevin", "NVTNoseHoover", "OptaxRelaxer", "RunResult", "SizeAwareSampler", "Stage",
           "StageState", "State", "ZarrData", "kinetic_energy", "maxwell_boltzmann", "status", "temperature"]
