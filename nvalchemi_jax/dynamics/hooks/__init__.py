"""Hooks called at the phases of a step (see :class:`Hook` and :class:`Stage`), and the
built-in ones: state modifiers (run inside the compiled step) and observers (record on
device, act on the host between chunks)."""

from nvalchemi_jax.dynamics.hooks.base import Hook, HookContext, Stage, run_hooks
from nvalchemi_jax.dynamics.hooks.modifiers import (BiasedPotentialHook, FreezeAtomsHook, MaxForceClampHook,
                                                     WrapPeriodicHook)
from nvalchemi_jax.dynamics.hooks.observers import (ConvergedSnapshotHook, EnergyDriftMonitorHook, LoggingHook,
                                                     NaNDetectorHook, ProfilerHook, SnapshotHook)

__all__ = ["BiasedPotentialHook", "ConvergedSnapshotHook", "EnergyDriftMonitorHook", "FreezeAtomsHook", "Hook",
           "HookContext", "LoggingHook", "MaxForceClampHook", "NaNDetectorHook", "ProfilerHook", "SnapshotHook",
           "Stage", "WrapPeriodicHook", "run_hooks"]
