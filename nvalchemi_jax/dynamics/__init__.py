"""Dynamics: pure steps, compiled run loops, hooks and convergence (see :mod:`.base`)."""

from nvalchemi_jax.dynamics import status
from nvalchemi_jax.dynamics.base import Dynamics, RunResult, StageState, State
from nvalchemi_jax.dynamics.convergence import ConvergenceHook, Criterion
from nvalchemi_jax.dynamics.hooks import Hook, HookContext, Stage
from nvalchemi_jax.dynamics.integrators import NVE
from nvalchemi_jax.dynamics.thermo import kinetic_energy, maxwell_boltzmann, temperature

__all__ = ["NVE", "ConvergenceHook", "Criterion", "Dynamics", "Hook", "HookContext",
           "RunResult", "Stage", "StageState", "State", "kinetic_energy", "maxwell_boltzmann",
           "status", "temperature"]
