"""`FusedStage` (``a + b``): several stages on one batch, one model evaluation per step.

Each system carries a status code: ``k`` while it is in stage ``k`` (in the
order the stages were added), ``len(stages)`` once it has left the last one
(the exit status), or FAILED. Every step:

1. each stage's ``pre_update`` runs on the whole batch but only the systems in
   that stage take the result (masked updates over a union state that holds
   every stage's variables for every slot; a system outside a stage keeps that
   stage's variables untouched);
2. the model is evaluated once for all systems;
3. each stage's ``post_update`` runs, masked the same way;
4. each stage's convergence test moves its converged systems to the next code.
   A system moves **at most one stage per step**: tests use the status it had
   at the start of the step, so it always takes at least one step in every stage.

Entering a stage re-initialises that stage's per-system variables (FIRE's dt
and alpha, thermostat chains, ...), restarts the system's step counter (so an
MD stage's ``n_steps`` budget counts from entry) and, by default, sets the
velocities: zero for optimizers, Maxwell–Boltzmann at the stage's temperature
for thermostatted MD (drawn from a stream that depends only on the sample id
and the stage, so fused equals sequential), unchanged for NVE.

Hooks: the fused stage's own hooks run at their phases for all systems.
A sub-stage's hooks run at their phases too, but see the state through that
stage (``state.stage`` is the sub-stage's own variables, ``ctx.active`` its
systems) and only their changes to the systems in that stage are kept;
its ON_CONVERGE hooks see the systems that left that stage in this step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics.base import Dynamics, State, blend_stage, blend_systems
from nvalchemi_jax.dynamics.hooks.base import HookContext, Stage, run_hooks
from nvalchemi_jax.dynamics.thermo import maxwell_boltzmann


def fuse(a: Dynamics, b: Dynamics) -> "FusedStage":
    """``a + b`` with nested fused stages flattened; every stage must share one model."""
    parts = lambda d: d.stages if isinstance(d, FusedStage) else (d,)
    stages = parts(a) + parts(b)
    hooks = (a.hooks if isinstance(a, FusedStage) else ()) + (b.hooks if isinstance(b, FusedStage) else ())
    return FusedStage(stages[0].model, stages=stages, hooks=hooks)


def _with_stage(state: State, k: int) -> State:
    return state.replace(stage=state.stage[k])


def _put_stage(new: State, old: State, k: int) -> State:
    stages = list(old.stage)
    stages[k] = new.stage
    return new.replace(stage=tuple(stages))


@struct.dataclass(kw_only=True, eq=False)
class FusedStage(Dynamics):
    """Stages run together on one batch (see the module docstring). Build with ``a + b``.

    stages: the sub-stages, in order; their status codes become 0, 1, ...
    thermalize: set velocities on entering a stage (zero for optimizers,
        Maxwell–Boltzmann at the stage temperature for thermostatted MD).
    """

    stages: tuple = ()
    thermalize: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        stages = tuple(self.stages)
        if len(stages) < 2:
            raise ValueError("FusedStage needs at least two stages")
        recoded = []
        for k, s in enumerate(stages):
            if isinstance(s, FusedStage):
                raise TypeError("FusedStage: nest with a + b, which flattens")
            if s.model is not self.model and jax.tree.structure(s.model) != jax.tree.structure(self.model):
                raise ValueError(f"FusedStage: stage {k} ({type(s).__name__}) uses a different model; "
                                 "fused stages share one model evaluation per step")
            if k < len(stages) - 1 and s.convergence_hook is None:
                raise ValueError(f"FusedStage: stage {k} ({type(s).__name__}) has no convergence criterion "
                                 "or n_steps, so no system would ever leave it")
            conv = s.convergence
            if conv is not None and (conv.source_status is not None or conv.target_status is not None):
                raise ValueError(f"FusedStage: stage {k} sets explicit source/target statuses; "
                                 "fused stages number them by position")
            recoded.append(dataclasses.replace(s, status_code=k))
        object.__setattr__(self, "stages", tuple(recoded))
        super().__post_init__()

    # ------------------------------------------------------------ configuration
    @property
    def wants_stress(self) -> bool:
        return any(s.wants_stress for s in self.stages)

    @property
    def exit_status(self) -> int:
        return len(self.stages)

    def check(self, batch) -> None:
        for s in self.stages:
            s.check(batch)

    def running(self, state, batch):
        return (state.status >= 0) & (state.status < len(self.stages)) & batch.system_mask

    def init_stage(self, state, batch):
        return tuple(s.init_stage(state, batch) for s in self.stages)

    # ------------------------------------------------------------ step
    def _phase(self, phase: Stage, state, batch, ctx, actives):
        state = run_hooks(self.hooks, phase, state, batch, ctx)
        for k, sub in enumerate(self.stages):
            if any(phase in h.stages and h.fn is not None for h in sub.hooks):
                new = run_hooks(sub.hooks, phase, _with_stage(state, k), batch,
                                ctx.replace(active=actives[k]))
                state = blend_systems(actives[k], _put_stage(new, state, k), state, batch)
        return state

    def _update(self, name: str, state, batch, actives):
        for k, sub in enumerate(self.stages):
            new = getattr(sub, name)(_with_stage(state, k), batch)
            state = blend_systems(actives[k], _put_stage(new, state, k), state, batch)
        return state

    def _enter(self, state, batch, j: int, entering):
        """Systems in ``entering (S,)`` start stage ``j``: fresh stage variables, step 0, velocities."""
        sub = self.stages[j]
        fresh = sub.init_stage(_with_stage(state, j), batch)
        atom = gather_systems(entering, batch.system_index, False)
        stages = list(state.stage)
        stages[j] = blend_stage(entering, fresh, state.stage[j], batch)
        state = state.replace(stage=tuple(stages), step=jnp.where(entering, 0, state.step),
                              previous_energy=jnp.where(entering, jnp.inf, state.previous_energy))
        if self.thermalize:
            velocities = None
            if getattr(sub, "zero_velocities_on_entry", False):
                velocities = jnp.zeros_like(state.velocities)
            elif "temperature" in fresh.system and getattr(sub, "thermalize_on_entry", True):
                key = jax.random.fold_in(state.key, 0x5354 + j)
                velocities = maxwell_boltzmann(batch, fresh.system["temperature"], key,
                                               remove_com=sub.conserves_momentum)
            if velocities is not None:
                moving = atom & ~batch.fixed
                state = state.replace(velocities=jnp.where(moving[:, None], velocities, state.velocities))
        return state

    def step(self, state: State, batch) -> State:
        start = state
        n = len(self.stages)
        actives = [(state.status == k) & batch.system_mask for k in range(n)]
        active = self.running(state, batch)
        ctx = HookContext(step=state.global_step, active=active, converged=jnp.zeros_like(active))
        phase = lambda p, s: self._phase(p, s, batch, ctx, actives)
        state = phase(Stage.BEFORE_STEP, state)
        state = phase(Stage.BEFORE_PRE_UPDATE, state)
        state = self._update("pre_update", state, batch, actives)
        state = phase(Stage.AFTER_PRE_UPDATE, state)
        state = phase(Stage.BEFORE_COMPUTE, state)
        state = self.compute(state, batch)
        state = phase(Stage.AFTER_COMPUTE, state)
        state = phase(Stage.BEFORE_POST_UPDATE, state)
        state = self._update("post_update", state, batch, actives)
        state = phase(Stage.AFTER_POST_UPDATE, state)
        state = state.replace(step=state.step + active.astype(jnp.int32))
        state = self._mark_failures(start, state, batch, active)

        # Convergence, judged against each system's stage at the start of the step.
        status = state.status
        converged = []
        for k, sub in enumerate(self.stages):
            conv = sub.convergence_hook
            done = jnp.zeros_like(active)
            if conv is not None:
                done = conv.met(_with_stage(state, k), batch) & actives[k] & (state.status == k)
            converged.append(done)
            status = jnp.where(done, k + 1, status)
        state = state.replace(status=status)
        for j in range(1, n):
            state = jax.lax.cond(jnp.any(converged[j - 1]),
                                 lambda s: self._enter(s, batch, j, converged[j - 1]), lambda s: s, state)
        any_converged = jnp.zeros_like(active)
        for c in converged:
            any_converged = any_converged | c
        if any(Stage.ON_CONVERGE in h.stages for s in self.stages for h in s.hooks) or \
                any(Stage.ON_CONVERGE in h.stages for h in self.hooks):
            state = run_hooks(self.hooks, Stage.ON_CONVERGE, state, batch, ctx.replace(converged=any_converged))
            for k, sub in enumerate(self.stages):
                if any(Stage.ON_CONVERGE in h.stages for h in sub.hooks):
                    sub_ctx = ctx.replace(active=actives[k], converged=converged[k])
                    new = run_hooks(sub.hooks, Stage.ON_CONVERGE, _with_stage(state, k), batch, sub_ctx)
                    state = blend_systems(converged[k], _put_stage(new, state, k), state, batch)
        ctx = ctx.replace(converged=any_converged)
        state = phase(Stage.AFTER_STEP, state)
        return state.replace(global_step=state.global_step + 1)
