"""Convergence: an AND of per-system criteria, and the status migration it drives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from nvalchemi_jax import segments

KEYS = ("fmax", "forces", "energy_change", "stress", "step", "custom")
REDUCTIONS = ("max", "mean", "sum", "norm", "min")


def reduce_atoms(values: jax.Array, batch, op: str) -> jax.Array:
    """Reduce per-atom ``values (N,)`` to per-system ``(S,)`` (padding atoms ignored)."""
    n_sys, index = batch.num_systems, batch.system_index
    mask = batch.atom_mask
    if op == "max":
        return segments.segment_max(jnp.where(mask, values, -jnp.inf), index, n_sys)
    if op == "min":
        return segments.segment_min(jnp.where(mask, values, jnp.inf), index, n_sys)
    total = segments.segment_sum(jnp.where(mask, values, 0.0), index, n_sys)
    if op == "sum":
        return total
    if op == "mean":
        return total / jnp.maximum(batch.n_atoms, 1)
    if op == "norm":
        return jnp.sqrt(segments.segment_sum(jnp.where(mask, values**2, 0.0), index, n_sys))
    raise ValueError(f"unknown reduce_op {op!r}; expected one of {REDUCTIONS}")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One test ``value <= threshold`` per system (``value >= threshold`` for ``"step"``).

    key: ``"fmax"`` max per-atom force norm (eV/Å); ``"forces"`` per-atom force
    norms reduced by ``reduce_op``; ``"energy_change"`` |E − E_previous step| (eV);
    ``"stress"`` largest |σ + p 1| component (eV/Å³; p is the stage's applied
    pressure, 0 if none); ``"step"`` the system's own step counter (a budget);
    ``"custom"``: ``custom(state, batch)`` returns ``(S,)`` values or ``(N,)``
    per-atom values reduced by ``reduce_op``.
    """

    key: str
    threshold: float
    reduce_op: str = "max"
    custom: Callable | None = None

    def __post_init__(self):
        if self.key not in KEYS:
            raise ValueError(f"Criterion.key must be one of {KEYS}, got {self.key!r}")
        if self.reduce_op not in REDUCTIONS:
            raise ValueError(f"Criterion.reduce_op must be one of {REDUCTIONS}, got {self.reduce_op!r}")
        if (self.key == "custom") != (self.custom is not None):
            raise ValueError("Criterion: key='custom' needs a custom function, and only it")
        if not self.threshold >= 0:
            raise ValueError(f"Criterion.threshold must be >= 0, got {self.threshold}")

    def value(self, state, batch) -> jax.Array:
        if self.key in ("fmax", "forces"):
            norms = jnp.linalg.norm(state.forces, axis=-1)
            return reduce_atoms(norms, batch, "max" if self.key == "fmax" else self.reduce_op)
        if self.key == "energy_change":
            return jnp.abs(state.energy - state.previous_energy)
        if self.key == "stress":
            pressure = applied_pressure(state)
            eye = jnp.eye(3, dtype=state.stress.dtype)
            return jnp.max(jnp.abs(state.stress + pressure[:, None, None] * eye), axis=(-2, -1))
        if self.key == "step":
            return state.step
        values = self.custom(state, batch)
        if values.shape[0] == batch.num_atoms and batch.num_atoms != batch.num_systems:
            values = reduce_atoms(values, batch, self.reduce_op)
        return values

    def met(self, state, batch) -> jax.Array:
        value = self.value(state, batch)
        if self.key == "step":
            return value >= self.threshold
        return value <= self.threshold


def applied_pressure(state) -> jax.Array:
    """``(S,)`` external pressure of the running stage (eV/Å³), 0 when it has none."""
    system = getattr(state.stage, "system", {})
    if "pressure" in system:
        return system["pressure"]
    return jnp.zeros_like(state.energy)


@dataclasses.dataclass(frozen=True)
class ConvergenceHook:
    """Systems whose every criterion holds move from ``source_status`` to ``target_status``.

    Defaults: the dynamics' own status code and the next one (its exit).
    ON_CONVERGE hooks of the dynamics then run with ``ctx.converged`` set.

    Example::

        ConvergenceHook.from_fmax(0.05)
        ConvergenceHook([Criterion("fmax", 0.05), Criterion("energy_change", 1e-6)])
    """

    criteria: tuple[Criterion, ...]
    source_status: int | None = None
    target_status: int | None = None

    def __post_init__(self):
        criteria = tuple(self.criteria) if isinstance(self.criteria, Sequence) else (self.criteria,)
        criteria = tuple(c if isinstance(c, Criterion) else Criterion(**c) for c in criteria)
        if not criteria:
            raise ValueError("ConvergenceHook needs at least one criterion")
        object.__setattr__(self, "criteria", criteria)

    @classmethod
    def from_fmax(cls, threshold: float, **kwargs) -> "ConvergenceHook":
        """Converged when the largest per-atom force norm is at most ``threshold`` eV/Å."""
        return cls((Criterion("fmax", threshold),), **kwargs)

    @classmethod
    def from_steps(cls, n_steps: int, **kwargs) -> "ConvergenceHook":
        """Converged after ``n_steps`` steps of the system's own (an MD budget)."""
        return cls((Criterion("step", n_steps),), **kwargs)

    def needs_stress(self) -> bool:
        return any(c.key == "stress" for c in self.criteria)

    def met(self, state, batch) -> jax.Array:
        """``(S,) bool``: every criterion holds."""
        result = self.criteria[0].met(state, batch)
        for c in self.criteria[1:]:
            result = result & c.met(state, batch)
        return result
