"""Variable-cell FIRE: atoms and cell relaxed together under an applied pressure.

The equivalent of ASE's ``FIRE(FrechetCellFilter(atoms, scalar_pressure=p))``,
one independent optimizer per system. A system's degrees of freedom are

* the atoms' positions in the *undeformed* frame, ``r₀ = r F⁻ᵀ``, and
* ``c · log F``, the matrix logarithm of the deformation gradient
  ``F`` (``cell = cell₀ Fᵀ``, cell₀ the cell when the stage began) scaled by
  ``c = cell_factor`` (default: the system's number of atoms),

with the generalised forces ``f₀ = f F`` on the atoms and, on the cell, the
derivative of the enthalpy ``E + pV`` along ``log F``: the virial
``W = −V (σ + p 1)`` pulled back through the Fréchet derivative of the matrix
exponential, divided by ``c``. FIRE (:class:`~.fire.FIRE`, ASE semantics, unit
masses) then runs on all ``3N + 9`` coordinates of a system at once: one power,
one pair of norms and one step-length clip per system.

``log F`` is kept in ``state.stage.system["log_deformation"]`` (so no matrix
logarithm is ever taken) and its fictitious velocity in ``"cell_velocity"``;
atom velocities (in the undeformed frame) live in ``state.velocities``.

Converge on forces and stress together, e.g.
``ConvergenceHook([Criterion("fmax", 0.05), Criterion("stress", 1e-4)])``: the
applied pressure is stored as ``state.stage.system["pressure"]``, so the stress
criterion measures ``max |σ + p 1|`` (eV/Å³). (ASE's own test on a filter differs: it
bounds the generalised forces, ``f F`` and the scaled cell force.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from nvalchemi_jax._linalg import matmul3, vecmat
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics.base import StageState, per_system
from nvalchemi_jax.dynamics.optimizers.fire import (
    FIRE, check_positive, check_range, fire_variables, per_atom, step_scale, system_dot, unit_mass_kick)
from nvalchemi_jax.models.base import volume

_TAYLOR_ORDER = 14
_MAX_SQUARINGS = 24


def expm3(a: jax.Array) -> jax.Array:
    """Matrix exponential of ``(..., 3, 3)`` matrices, differentiable.

    Scaling and squaring with a Taylor series (``|a / 2^s|_∞ ≤ ½``, order 14,
    truncation error below 1e-16), written with elementwise 3×3 products so a
    GPU never lowers it to TF32.
    """
    norm = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)
    squarings = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-300) / 0.5)), 0, _MAX_SQUARINGS)
    squarings = jax.lax.stop_gradient(squarings)
    x = a * jnp.exp2(-squarings)[..., None, None]
    eye = jnp.broadcast_to(jnp.eye(3, dtype=a.dtype), a.shape)

    def horner(j, r):                         # I + x (I + x/2 (I + x/3 (...)))
        return eye + matmul3(x, r) / (_TAYLOR_ORDER - j).astype(a.dtype)

    def square(i, r):
        return jnp.where((i < squarings)[..., None, None], matmul3(r, r), r)

    # Loops rather than unrolled products keep the compiled program small.
    r = jax.lax.fori_loop(0, _TAYLOR_ORDER, horner, eye)
    r = jax.lax.fori_loop(0, _MAX_SQUARINGS, square, r)
    return r


def expm3_adjoint(log_f: jax.Array, g: jax.Array) -> jax.Array:
    """``(..., 3, 3)``: the gradient ``G`` with respect to ``F = exp(L)`` pulled back to ``L``,
    i.e. ``Σ_ij G_ij ∂F_ij/∂L`` (the adjoint of the Fréchet derivative of exp at ``L``)."""
    _, pull = jax.vjp(expm3, log_f)
    return pull(g)[0]


def inverse3(m: jax.Array) -> jax.Array:
    """Inverse of ``(..., 3, 3)`` matrices from the adjugate (well conditioned here: F ≈ 1)."""
    cof = jnp.stack([jnp.cross(m[..., 1, :], m[..., 2, :]), jnp.cross(m[..., 2, :], m[..., 0, :]),
                     jnp.cross(m[..., 0, :], m[..., 1, :])], axis=-2)   # rows: cofactors of columns
    det = jnp.sum(m[..., 0, :] * cof[..., 0, :], axis=-1)
    return transpose(cof) / det[..., None, None]


def transpose(m: jax.Array) -> jax.Array:
    return jnp.swapaxes(m, -1, -2)


@struct.dataclass(kw_only=True, eq=False)
class CellFIRE(FIRE):
    """FIRE on positions and cell together: ASE's ``FIRE(FrechetCellFilter(atoms,
    scalar_pressure=pressure))``, per system.

    pressure: applied external pressure, eV/Å³ (scalar or ``(S,)``; see
    :func:`nvalchemi_jax.units.gpa_to_stress`). cell_factor: the scale of the cell
    coordinates (ASE's ``exp_cell_factor``), default each system's number of atoms;
    a scalar or ``(S,)``. hydrostatic_strain: only uniform scaling of the cell (the
    virial replaced by its mean diagonal). constant_volume: project the isotropic
    part out of the cell force (volume kept approximately, as in ASE). The FIRE
    parameters (dt fs, max_step Å, ...) are those of :class:`~.fire.FIRE`; the
    step-length clip covers atoms and cell coordinates together.

    The cell really changes: ``state.cell`` and ``state.positions`` are updated
    together (atoms follow the deformation). Fixed atoms stay where they are.

    Example::

        relax = CellFIRE(model, pressure=units.gpa_to_stress(1.0), convergence=ConvergenceHook(
            [Criterion("fmax", 0.05), Criterion("stress", 1e-4)]))
        result = relax.run(batch)
    """

    pressure: float = 0.0
    cell_factor: float | None = None
    hydrostatic_strain: bool = struct.field(pytree_node=False, default=False)
    constant_volume: bool = struct.field(pytree_node=False, default=False)

    needs_stress = True

    def validate(self):
        super().validate()
        check_positive(type(self).__name__, cell_factor=self.cell_factor)
        check_range(type(self).__name__, pressure=self.pressure)

    def init_stage(self, state, batch):
        sys = self.fire_parameters(batch)
        n_atoms = jnp.maximum(batch.n_atoms, 1).astype(batch.positions.dtype)
        factor = n_atoms if self.cell_factor is None else per_system(self.cell_factor, batch)
        zeros = jnp.zeros((batch.num_systems, 3, 3), batch.positions.dtype)
        sys.update(pressure=per_system(self.pressure, batch), cell_factor=factor,
                   reference_cell=state.cell, log_deformation=zeros, cell_velocity=zeros)
        return StageState(system=sys)

    def cell_forces(self, state, inv_deform, pull) -> jax.Array:
        """``(S, 3, 3)`` generalised forces on the cell coordinates ``c log F`` (eV/Å);
        ``pull`` is the vjp of ``exp`` at the current ``log F``."""
        sys = state.stage.system
        eye = jnp.eye(3, dtype=state.stress.dtype)
        virial = -volume(state.cell)[:, None, None] * (
            state.stress + sys["pressure"][:, None, None] * eye)
        if self.hydrostatic_strain:
            virial = (jnp.trace(virial, axis1=-2, axis2=-1) / 3.0)[:, None, None] * eye
        # -dH/dF = W F^-T, then through F = exp(L) to L, then scaled like the coordinates.
        force = pull(matmul3(virial, transpose(inv_deform)))[0]
        force = force / sys["cell_factor"][:, None, None]
        if self.constant_volume:
            force = force - (jnp.trace(force, axis1=-2, axis2=-1) / 3.0)[:, None, None] * eye
        return force

    def pre_update(self, state, batch):
        sys = state.stage.system
        log_f = sys["log_deformation"]
        deform, pull = jax.vjp(expm3, log_f)
        inv_deform = inverse3(deform)
        idx = batch.system_index
        # Atoms in the undeformed frame: r0 = r F^-T, forces f0 = f F.
        r0 = vecmat(state.positions, gather_systems(transpose(inv_deform), idx))
        f = vecmat(state.forces, gather_systems(deform, idx))
        fc = self.cell_forces(state, inv_deform, pull)
        started = sys["started"]
        v = jnp.where(gather_systems(started, idx, False)[:, None], state.velocities, 0.0)
        vc = jnp.where(started[:, None, None], sys["cell_velocity"], 0.0)

        cell_dot = lambda a, b: jnp.sum(a * b, axis=(-2, -1))
        keep, push, sys = fire_variables(
            sys, system_dot(f, v, batch) + cell_dot(fc, vc), system_dot(f, f, batch) + cell_dot(fc, fc),
            system_dot(v, v, batch) + cell_dot(vc, vc), started)
        dt = sys["dt"]
        kick = unit_mass_kick(dt)
        v = per_atom(keep, batch) * v + per_atom(push, batch) * f + per_atom(kick, batch) * f
        vc = keep[:, None, None] * vc + (push + kick)[:, None, None] * fc
        dr, drc = per_atom(dt, batch) * v, dt[:, None, None] * vc
        scale = step_scale(system_dot(dr, dr, batch) + cell_dot(drc, drc), sys["max_step"])
        dr, drc = dr * per_atom(scale, batch), drc * scale[:, None, None]

        log_f = log_f + drc / sys["cell_factor"][:, None, None]
        deform = expm3(log_f)
        cell = matmul3(sys["reference_cell"], transpose(deform))
        positions = vecmat(r0 + dr, gather_systems(transpose(deform), idx))
        sys = {**sys, "log_deformation": log_f, "cell_velocity": vc}
        return state.replace(positions=positions, velocities=v, cell=cell,
                             stage=state.stage.replace(system=sys))
