"""NPT and NPH: the Martyna–Tobias–Klein barostat, with Nosé–Hoover chains for NPT.

Equations of motion (MTK 1994; Tuckerman et al., J. Phys. A 39, 5629 (2006)),
with cell rows as lattice vectors, a symmetric cell-velocity (strain-rate)
matrix ``v_g`` (1/fs), ``N_f`` particle degrees of freedom and ``d = 3``::

    dr_i/dt = v_i + r_i v_g                          dH/dt   = H v_g
    m_i dv_i/dt = F_i − m_i v_i (v_g + tr(v_g)/N_f) − v_ξ1 m_i v_i
    W dv_g/dt = Proj[ Σ m v vᵀ − V σ − P V 1 + (2 K / N_f) 1 ] − v_η1 W v_g

``σ`` is the configurational stress (ASE sign, tensile positive), ``K`` the
kinetic energy, ``P`` the applied pressure and ``Proj`` the projection of the
driving tensor onto the allowed cell motions:

* ``"isotropic"``: ``v_g = v_ε 1`` — the volume fluctuates, the shape is fixed
  (``Proj`` takes the trace part);
* ``"anisotropic"``: ``v_g`` diagonal — the three axes of an orthorhombic cell
  move independently (``Proj`` keeps the diagonal);
* ``"triclinic"``: ``v_g`` a full symmetric 3×3 — every cell degree of freedom
  but rotations (``Proj`` keeps the symmetric part).

``ξ``/``η`` are Nosé–Hoover chains (length ``chain_length``) on the particles
and on the barostat. One step is the symmetric Trotter splitting::

    chains ½dt → barostat ½dt → kick ½dt → drift dt (positions and cell)
    → forces and stress → kick ½dt → barostat ½dt → chains ½dt

with the exact exponential/sinh solutions of the linear kick and drift
sub-steps, and Suzuki–Yoshida sub-steps for the chains. It conserves::

    H' = U + K + P V + ½ W |v_g|² + Σ_j ½ Q_j v_ξj² + kT (N_f ξ_1 + Σ_{j>1} ξ_j)
                                  + Σ_j ½ Q'_j v_ηj² + kT (n_b η_1 + Σ_{j>1} η_j)

(:func:`npt_conserved_energy`; NPH keeps only the first line, an enthalpy).

Masses (eV·fs², from each system's own degrees of freedom): the barostat
``W = (N_f + 3) kT τ_p² / 3`` per matrix element, so that the volume mode has
the MTK mass ``(N_f + 3) kT τ_p²`` in every coupling; ``Q_1 = N_f kT τ_t²``,
``Q_j = kT τ_t²``; ``Q'_1 = n_b kT τ_p²``, ``Q'_j = kT τ_p²`` with ``n_b`` = 1,
3 or 6 barostat degrees of freedom. With these masses the volume of a solid
oscillates with angular frequency about ``3 sqrt(V B / (N_f kT)) / τ_p`` (``B``
the bulk modulus): at low temperature the barostat is much faster than
``τ_p`` suggests, so pick a larger ``τ_p`` for cold solids.

Every system must be periodic along all three axes. Fixed atoms are not
supported (the cell motion would have to move them). ``N_f = 3N − 3``: start
from velocities without centre-of-mass motion (as
:func:`~nvalchemi_jax.dynamics.thermo.maxwell_boltzmann` draws them); the
equations keep the total momentum at zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax import units
from nvalchemi_jax._linalg import matmul3, vecmat
from nvalchemi_jax.batch import Batch, gather_systems, sum_systems
from nvalchemi_jax.dynamics import thermo
from nvalchemi_jax.dynamics.base import (
    Dynamics, StageState, _concrete, check_non_negative, check_positive, per_system)
from nvalchemi_jax.models.base import volume

COUPLINGS = ("isotropic", "anisotropic", "triclinic")
#: Independent cell degrees of freedom of each coupling (those the barostat chain sees).
BAROSTAT_DOF = {"isotropic": 1, "anisotropic": 3, "triclinic": 6}
#: Temperature (K) below which the masses stop shrinking, so T = 0 (a quench) stays defined.
MASS_TEMPERATURE_FLOOR = 1.0


def _yoshida_weights(order: int) -> tuple[float, ...]:
    if order == 1:
        return (1.0,)
    if order == 3:
        w = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
        return (w, 1.0 - 2.0 * w, w)
    w = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
    return (w, w, 1.0 - 4.0 * w, w, w)


def _sinhc(x):
    """sinh(x)/x, accurate near 0."""
    small = jnp.abs(x) < 1e-3
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + x * x / 6.0 + x**4 / 120.0, jnp.sinh(safe) / safe)


def _eye(like):
    return jnp.broadcast_to(jnp.eye(3, dtype=like.dtype), like.shape[:-2] + (3, 3))


def project(tensor: jax.Array, coupling: str) -> jax.Array:
    """The part of ``tensor (S, 3, 3)`` along the cell motions ``coupling`` allows
    (an orthogonal projection in the Frobenius inner product)."""
    eye = _eye(tensor)
    if coupling == "isotropic":
        return jnp.trace(tensor, axis1=-2, axis2=-1)[:, None, None] / 3.0 * eye
    if coupling == "anisotropic":
        return tensor * eye
    return 0.5 * (tensor + jnp.swapaxes(tensor, -1, -2))


def _eig(matrix: jax.Array, coupling: str):
    """Eigenvalues ``(S, 3)`` and eigenvectors ``(S, 3, 3)`` (columns; ``None`` when
    the matrix is diagonal) of a symmetric ``matrix (S, 3, 3)``."""
    if coupling == "triclinic":
        return jnp.linalg.eigh(matrix)
    return jnp.diagonal(matrix, axis1=-2, axis2=-1), None


def _apply_diagonal(vectors, factors, basis, system_index):
    """Scale the components of row ``vectors (N, 3)`` along the eigenvectors of their
    system by ``factors (N, 3)`` (``basis`` ``(S, 3, 3)`` or ``None`` for the axes)."""
    if basis is None:
        return vectors * factors
    u = gather_systems(basis, system_index)
    in_basis = vecmat(vectors, u)
    return vecmat(in_basis * factors, jnp.swapaxes(u, -1, -2))


def _chain_half_step(v, xi, mass, twice_kinetic, dof, kt, dt_half, weights, substeps):
    """Half step ``dt_half (S,)`` of Nosé–Hoover chains ``v, xi, mass (S, L)`` driven by a
    kinetic energy ``twice_kinetic/2 (S,)`` of ``dof (S,)`` degrees of freedom at ``kt (S,)``.

    Returns the new chain velocities and positions and the factor ``(S,)`` by which
    the thermostatted velocities must be scaled."""
    length = v.shape[-1]
    v = [v[:, j] for j in range(length)]
    xi = [xi[:, j] for j in range(length)]
    q = [mass[:, j] for j in range(length)]
    scale = jnp.ones_like(twice_kinetic)

    def force(j, k2):
        if j == 0:
            return (k2 - dof * kt) / q[0]
        return (q[j - 1] * v[j - 1] ** 2 - kt) / q[j]

    for w in weights:
        for _ in range(substeps):
            h = w * dt_half / substeps
            k2 = twice_kinetic * scale**2
            v[-1] = v[-1] + 0.5 * h * force(length - 1, k2)
            for j in range(length - 2, -1, -1):
                e = jnp.exp(-0.25 * h * v[j + 1])
                v[j] = (v[j] * e + 0.5 * h * force(j, k2)) * e
            scale = scale * jnp.exp(-h * v[0])
            k2 = twice_kinetic * scale**2
            xi = [x + h * vj for x, vj in zip(xi, v)]
            for j in range(length - 1):
                e = jnp.exp(-0.25 * h * v[j + 1])
                v[j] = (v[j] * e + 0.5 * h * force(j, k2)) * e
            v[-1] = v[-1] + 0.5 * h * force(length - 1, k2)
    return jnp.stack(v, axis=-1), jnp.stack(xi, axis=-1), scale


def _barostat_kinetic(system) -> jax.Array:
    """``(S,)`` ½ W |v_g|² in eV."""
    return 0.5 * system["barostat_mass"] * jnp.sum(system["strain_rate"] ** 2, axis=(-2, -1))


@struct.dataclass(kw_only=True, eq=False)
class MTKBarostat(Dynamics):
    """What :class:`NPT` and :class:`NPH` share: the MTK barostat (see the module docstring).

    dt: fs. pressure: applied hydrostatic pressure in eV/Å³ (:func:`units.gpa_to_stress`,
    :func:`units.bar_to_stress`; negative = tension). tau_p: barostat time constant in fs.
    temperature: K, sets the masses (and, for NPT, the target). All are scalars or per
    system ``(S,)``. coupling: ``"isotropic"``, ``"anisotropic"`` or ``"triclinic"``.
    Needs the stress every step; ``StageState.system["pressure"]`` is the applied
    pressure (read by the ``"stress"`` convergence criterion).
    """

    dt: float = 1.0
    pressure: float = 0.0
    tau_p: float = 1000.0
    temperature: float | None = None
    coupling: str = struct.field(pytree_node=False, default="isotropic")

    needs_stress = True
    conserves_momentum = True
    #: Whether the particles and the barostat carry Nosé–Hoover chains.
    thermostatted = False

    # ------------------------------------------------------------ checks
    def validate(self):
        name = type(self).__name__
        check_positive(name, dt=self.dt, tau_p=self.tau_p)
        check_non_negative(name, temperature=self.temperature)
        if self.pressure is None:
            raise ValueError(f"{name}.pressure must be a number of eV/Å³, got None")
        if _concrete(self.pressure) and not np.all(np.isfinite(np.asarray(self.pressure, float))):
            raise ValueError(f"{name}.pressure must be finite (eV/Å³), got {self.pressure!r}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"{name}.coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if not self.thermostatted:
            return
        check_positive(name, tau_t=self.tau_t)
        if self.temperature is None:
            raise ValueError(f"{name}.temperature must be a number of K, got None")
        for field in ("chain_length", "chain_substeps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be an int >= 1, got {value!r}")
        if self.yoshida_order not in (1, 3, 5):
            raise ValueError(f"{name}.yoshida_order must be 1, 3 or 5, got {self.yoshida_order!r}")

    def check(self, batch: Batch) -> None:
        super().check(batch)        # stress: raises unless every system is fully periodic
        if _concrete(batch.fixed) and bool(np.any(np.asarray(batch.fixed & batch.atom_mask))):
            raise ValueError(f"{type(self).__name__} does not support fixed atoms "
                             "(the cell motion would have to move them)")

    # ------------------------------------------------------------ state
    def _mass_kt(self, state, batch):
        t = self.temperature
        if t is None:   # NPH without a reference temperature: the initial kinetic one
            t = thermo.temperature(state.velocities, batch)
        t = per_system(t, batch)
        return units.KB * jnp.maximum(t, MASS_TEMPERATURE_FLOOR)

    def init_stage(self, state, batch):
        dtype = batch.positions.dtype
        s = batch.num_systems
        dof = thermo.degrees_of_freedom(batch).astype(dtype)
        kt = self._mass_kt(state, batch)
        tau_p = per_system(self.tau_p, batch)
        system = {
            "dt": per_system(self.dt, batch),
            "pressure": per_system(self.pressure, batch),
            "strain_rate": jnp.zeros((s, 3, 3), dtype),
            # per matrix element; the volume mode gets (N_f + 3) kT τ_p² (MTK).
            "barostat_mass": (dof + 3.0) * kt * tau_p**2 / 3.0,
        }
        if self.thermostatted:
            tau_t = per_system(self.tau_t, batch)
            length = self.chain_length
            first = jnp.arange(length) == 0
            n_b = float(BAROSTAT_DOF[self.coupling])
            zeros = jnp.zeros((s, length), dtype)
            system.update(
                temperature=per_system(self.temperature, batch),
                thermostat_mass=jnp.where(first, dof[:, None], 1.0) * (kt * tau_t**2)[:, None],
                thermostat_position=zeros, thermostat_velocity=zeros,
                barostat_thermostat_mass=jnp.where(first, n_b, 1.0) * (kt * tau_p**2)[:, None],
                barostat_thermostat_position=zeros, barostat_thermostat_velocity=zeros,
            )
        return StageState(system=system)

    # ------------------------------------------------------------ sub-steps
    def _thermostats(self, state, batch):
        """Half step of both chains (particles and barostat)."""
        if not self.thermostatted:
            return state
        system = dict(state.stage.system)
        half = 0.5 * system["dt"]
        kt = units.KB * system["temperature"]
        weights = _yoshida_weights(self.yoshida_order)
        dof = thermo.degrees_of_freedom(batch).astype(half.dtype)
        v, xi, scale = _chain_half_step(
            system["thermostat_velocity"], system["thermostat_position"], system["thermostat_mass"],
            2.0 * thermo.kinetic_energy(state.velocities, batch), dof, kt, half, weights,
            self.chain_substeps)
        system.update(thermostat_velocity=v, thermostat_position=xi)
        velocities = state.velocities * gather_systems(scale, batch.system_index)[:, None]
        n_b = jnp.full_like(half, BAROSTAT_DOF[self.coupling])
        v, xi, scale = _chain_half_step(
            system["barostat_thermostat_velocity"], system["barostat_thermostat_position"],
            system["barostat_thermostat_mass"], 2.0 * _barostat_kinetic(system), n_b, kt, half,
            weights, self.chain_substeps)
        system.update(barostat_thermostat_velocity=v, barostat_thermostat_position=xi,
                      strain_rate=system["strain_rate"] * scale[:, None, None])
        return state.replace(velocities=velocities, stage=state.stage.replace(system=system))

    def _barostat(self, state, batch):
        """Half step of the cell velocity under the pressure imbalance."""
        system = dict(state.stage.system)
        v = state.velocities
        mvv = sum_systems(
            jnp.where(batch.atom_mask, batch.masses, 0.0)[:, None, None] * v[:, :, None] * v[:, None, :],
            batch) * units.MV2_TO_EV                                                 # (S, 3, 3) eV
        dof = thermo.degrees_of_freedom(batch).astype(v.dtype)
        twice_kinetic = jnp.trace(mvv, axis1=-2, axis2=-1)
        vol = volume(state.cell)
        eye = _eye(mvv)
        drive = (mvv - vol[:, None, None] * state.stress
                 + (twice_kinetic / dof - system["pressure"] * vol)[:, None, None] * eye)
        rate = (system["strain_rate"] + (0.5 * system["dt"] / system["barostat_mass"])[:, None, None]
                * project(drive, self.coupling))
        system["strain_rate"] = rate
        return state.replace(stage=state.stage.replace(system=system))

    def _kick(self, state, batch):
        """Half kick with the barostat's friction: dv/dt = F/m − v (v_g + tr(v_g)/N_f)."""
        system = state.stage.system
        dof = thermo.degrees_of_freedom(batch).astype(state.velocities.dtype)
        rate = system["strain_rate"]
        friction = rate + (jnp.trace(rate, axis1=-2, axis2=-1) / dof)[:, None, None] * _eye(rate)
        lam, basis = _eig(friction, self.coupling)
        t = gather_systems(0.5 * system["dt"], batch.system_index)[:, None]
        x = gather_systems(lam, batch.system_index) * t                       # (N, 3)
        accel = state.forces / batch.masses[:, None] * units.FORCE_TO_ACCELERATION
        index = batch.system_index
        velocities = (_apply_diagonal(state.velocities, jnp.exp(-x), basis, index)
                      + _apply_diagonal(accel, t * jnp.exp(-0.5 * x) * _sinhc(0.5 * x), basis, index))
        return state.replace(velocities=velocities)

    def _drift(self, state, batch):
        """Positions and cell over dt: dr/dt = v + r v_g, dH/dt = H v_g (exact for fixed v, v_g)."""
        system = state.stage.system
        lam, basis = _eig(system["strain_rate"], self.coupling)
        dt = system["dt"]
        index = batch.system_index
        t = gather_systems(dt, index)[:, None]
        x = gather_systems(lam, index) * t
        positions = (_apply_diagonal(state.positions, jnp.exp(x), basis, index)
                     + _apply_diagonal(state.velocities, t * jnp.exp(0.5 * x) * _sinhc(0.5 * x),
                                       basis, index))
        growth = jnp.exp(lam * dt[:, None])                                    # (S, 3)
        if basis is None:
            cell = state.cell * growth[:, None, :]
        else:
            cell = matmul3(state.cell, matmul3(basis * growth[:, None, :], jnp.swapaxes(basis, -1, -2)))
        # empty slots keep their (zero) cell
        cell = jnp.where(batch.system_mask[:, None, None], cell, state.cell)
        return state.replace(positions=positions, cell=cell)

    # ------------------------------------------------------------ step
    def pre_update(self, state, batch):
        state = self._thermostats(state, batch)
        state = self._barostat(state, batch)
        state = self._kick(state, batch)
        return self._drift(state, batch)

    def post_update(self, state, batch):
        state = self._kick(state, batch)
        state = self._barostat(state, batch)
        return self._thermostats(state, batch)


@struct.dataclass(kw_only=True, eq=False)
class NPT(MTKBarostat):
    """Isothermal–isobaric MD: MTK barostat with Nosé–Hoover chains (see the module docstring).

    dt: fs. temperature: K (>= 0). pressure: applied hydrostatic pressure in eV/Å³
    (:func:`units.gpa_to_stress`, :func:`units.bar_to_stress`; negative = tension).
    tau_t, tau_p: thermostat and barostat time constants in fs. All five are
    scalars or per system ``(S,)``. coupling: ``"isotropic"``, ``"anisotropic"``
    or ``"triclinic"``. chain_length: Nosé–Hoover chain length (both chains).
    chain_substeps, yoshida_order (1, 3 or 5): integration of the chains.

    ``StageState.system`` holds ``dt``, ``temperature``, ``pressure`` (read by the
    ``"stress"`` convergence criterion), ``strain_rate`` ``(S, 3, 3)`` 1/fs,
    ``barostat_mass`` ``(S,)`` eV·fs² and the chains' masses (eV·fs²), positions
    (dimensionless) and velocities (1/fs), each ``(S, chain_length)``.

    Example::

        md = NPT(model=lj, dt=5.0, temperature=50.0, pressure=units.gpa_to_stress(0.5),
                 tau_t=200.0, tau_p=5000.0, coupling="isotropic", n_steps=10_000)
        result = md.run(batch)
        npt_conserved_energy(result.state, batch, md)   # (S,) eV, constant up to O(dt²)
    """

    temperature: float = 300.0
    tau_t: float = 100.0
    chain_length: int = struct.field(pytree_node=False, default=3)
    chain_substeps: int = struct.field(pytree_node=False, default=1)
    yoshida_order: int = struct.field(pytree_node=False, default=3)

    thermostatted = True


@struct.dataclass(kw_only=True, eq=False)
class NPH(MTKBarostat):
    """Isenthalpic MD: the MTK barostat of :class:`NPT` without thermostats.

    The conserved quantity is the enthalpy ``U + K + P V`` plus the barostat's
    kinetic energy (:func:`npt_conserved_energy`). ``temperature`` (K) only sets
    the barostat mass ``W``; by default each system's initial kinetic temperature
    (at least 1 K). dt, pressure, tau_p and coupling as in :class:`NPT`.
    ``StageState.system`` holds ``dt``, ``pressure``, ``strain_rate`` and ``barostat_mass``.

    Example::

        md = NPH(model=lj, dt=5.0, pressure=0.0, tau_p=5000.0, temperature=20.0, n_steps=1000)
    """


def npt_conserved_energy(state, batch: Batch, dynamics: MTKBarostat) -> jax.Array:
    """``(S,)`` extended energy in eV that :class:`NPT` and :class:`NPH` conserve:
    potential + kinetic + P·V + barostat kinetic energy (+ the chains' kinetic and
    "potential" terms for NPT). Its drift measures integration error."""
    if not isinstance(dynamics, MTKBarostat):
        raise TypeError(f"npt_conserved_energy needs an NPT or NPH, got {type(dynamics).__name__}")
    system = state.stage.system
    total = (state.energy + thermo.kinetic_energy(state.velocities, batch)
             + system["pressure"] * volume(state.cell) + _barostat_kinetic(system))
    if "thermostat_velocity" in system:
        kt = units.KB * system["temperature"]
        dof = thermo.degrees_of_freedom(batch).astype(total.dtype)
        n_b = float(BAROSTAT_DOF[dynamics.coupling])
        for prefix, first in (("thermostat_", dof), ("barostat_thermostat_", n_b)):
            v, xi, q = (system[prefix + k] for k in ("velocity", "position", "mass"))
            total = total + 0.5 * jnp.sum(q * v * v, axis=-1)
            total = total + kt * (first * xi[:, 0] + jnp.sum(xi[:, 1:], axis=-1))
    return jnp.where(batch.system_mask, total, 0.0)
