"""Kinetic energy, temperature, degrees of freedom, per-system random numbers and
Maxwell–Boltzmann velocities. Velocities are Å/fs throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvalchemi_jax import units
from nvalchemi_jax.batch import Batch, gather_systems, sum_systems
from nvalchemi_jax import segments


def kinetic_energy(velocities: jax.Array, batch: Batch) -> jax.Array:
    """``(S,)`` kinetic energy in eV of ``velocities (N, 3)`` Å/fs."""
    mv2 = batch.masses * jnp.sum(velocities * velocities, axis=-1)
    return 0.5 * units.MV2_TO_EV * sum_systems(jnp.where(batch.atom_mask, mv2, 0.0), batch)


def degrees_of_freedom(batch: Batch, remove_com: bool = True) -> jax.Array:
    """``(S,)`` kinetic degrees of freedom: 3 per free atom, less 3 when the centre-of-mass
    momentum is conserved and removed (NVE, Nosé–Hoover, and no fixed atoms); at least 1."""
    free = sum_systems((batch.atom_mask & ~batch.fixed).astype(jnp.int32), batch)
    # Fixed atoms break momentum conservation: then no centre-of-mass term to remove.
    any_fixed = sum_systems((batch.atom_mask & batch.fixed).astype(jnp.int32), batch) > 0
    dof = 3 * free - (3 if remove_com else 0) * ((free > 1) & ~any_fixed)
    return jnp.where(batch.system_mask, jnp.maximum(dof, 1), 1)


def temperature(velocities: jax.Array, batch: Batch, remove_com: bool = True) -> jax.Array:
    """``(S,)`` instantaneous kinetic temperature in K."""
    return 2.0 * kinetic_energy(velocities, batch) / (units.KB * degrees_of_freedom(batch, remove_com))


def remove_com_velocity(velocities: jax.Array, batch: Batch) -> jax.Array:
    """Subtract each system's centre-of-mass velocity (over free atoms; fixed atoms stay at 0)."""
    free = batch.atom_mask & ~batch.fixed
    m = jnp.where(free, batch.masses, 0.0)
    momentum = sum_systems(m[:, None] * velocities, batch)
    mass = sum_systems(m, batch)
    com = momentum / jnp.where(mass > 0, mass, 1.0)[:, None]
    return jnp.where(free[:, None], velocities - gather_systems(com, batch.system_index), 0.0)


def local_atom_index(batch: Batch) -> jax.Array:
    """``(N,)`` index of each atom within its own system (0 for padding)."""
    i = jnp.arange(batch.num_atoms, dtype=jnp.int32)
    first = segments.segment_min(i, batch.system_index, batch.num_systems)
    return jnp.where(batch.atom_mask, i - gather_systems(first, batch.system_index), 0)


def atom_normal(key: jax.Array, batch: Batch, step: jax.Array, salt: int = 0,
                dtype=None) -> jax.Array:
    """``(N, 3)`` standard normals that depend only on (key, salt, sample id, the system's
    ``step (S,)``, atom index within the system): a system's noise never depends on
    its slot or its batch mates."""
    dtype = dtype or batch.positions.dtype
    key = jax.random.fold_in(key, salt)
    system_keys = jax.vmap(lambda sid, st: jax.random.fold_in(jax.random.fold_in(key, sid), st))(
        batch.sample_id, step)
    owner = jnp.minimum(batch.system_index, batch.num_systems - 1)
    atom_keys = jax.vmap(jax.random.fold_in)(system_keys[owner], local_atom_index(batch))
    noise = jax.vmap(lambda k: jax.random.normal(k, (3,), dtype))(atom_keys)
    return jnp.where(batch.atom_mask[:, None], noise, 0.0)


def maxwell_boltzmann(batch: Batch, temperature_k, key: jax.Array, remove_com: bool = True,
                      exact: bool = False) -> jax.Array:
    """Velocities ``(N, 3)`` Å/fs drawn from the Maxwell–Boltzmann distribution.

    temperature_k: K, a scalar or ``(S,)``. Each system's draw depends only on
    its sample id. remove_com: zero each system's total momentum. exact: rescale
    so each system's kinetic temperature equals the target exactly.
    Fixed atoms get zero velocity.
    """
    t = jnp.broadcast_to(jnp.asarray(temperature_k, batch.positions.dtype), (batch.num_systems,))
    noise = atom_normal(key, batch, jnp.zeros(batch.num_systems, jnp.int32), salt=0x4D42)
    kt = units.KB * gather_systems(t, batch.system_index)
    # <v^2> per component = kT/m, with m v^2 in amu Å²/fs² = kT / MV2_TO_EV.
    sigma = jnp.sqrt(kt / (batch.masses * units.MV2_TO_EV))
    v = jnp.where((batch.atom_mask & ~batch.fixed)[:, None], noise * sigma[:, None], 0.0)
    if remove_com:
        v = remove_com_velocity(v, batch)
    if exact:
        current = temperature(v, batch, remove_com)
        scale = jnp.sqrt(jnp.where(current > 0, t / current, 0.0))
        v = v * gather_systems(scale, batch.system_index)[:, None]
    return v
