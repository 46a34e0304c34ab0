"""Hooks called at the phases of a step (see :class:`Hook` and :class:`Stage`)."""

from nvalchemi_jax.dynamics.hooks.base import Hook, HookContext, Stage, run_hooks

__all__ = ["Hook", "HookContext", "Stage", "run_hooks"]
