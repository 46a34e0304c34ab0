"""Metal units, as used at the API: Å, eV, amu, fs, K, eV/Å³.

Internally time is measured in Å·sqrt(amu/eV) (about 10.18 fs), the unit in
which ``F = m a`` needs no factor when forces are eV/Å and masses amu. Every
``dt`` a user passes is in fs and goes through :func:`fs_to_internal`.

Example::

    >>> from nvalchemi_jax import units
    >>> round(units.GPA, 6)            # eV/Å³ per GPa
    0.006242
    >>> units.stress_to_gpa(0.01)      # eV/Å³ -> GPa
    1.602176634
"""

import math

#: Boltzmann constant in eV/K (CODATA 2018, exact by SI definition).
KB = 8.617333262e-5
#: Elementary charge in C; 1 eV = E_CHARGE J (exact).
E_CHARGE = 1.602176634e-19
#: Atomic mass constant in kg (CODATA 2018).
AMU_KG = 1.66053906660e-27

#: One internal time unit, Å·sqrt(amu/eV), expressed in fs.
FS_PER_INTERNAL_TIME = 1e-10 * math.sqrt(AMU_KG / E_CHARGE) * 1e15
#: One fs in internal time units.
FS = 1.0 / FS_PER_INTERNAL_TIME

#: 1 eV/Å³ in Pa.
EV_PER_A3_IN_PA = E_CHARGE / 1e-30
#: 1 GPa in eV/Å³.
GPA = 1e9 / EV_PER_A3_IN_PA
#: 1 bar in eV/Å³.
BAR = 1e5 / EV_PER_A3_IN_PA


def fs_to_internal(dt_fs):
    """Convert a time step (or any time) from fs to internal units (works on arrays)."""
    return dt_fs * FS


def internal_to_fs(t):
    """Convert a time from internal units to fs (works on arrays)."""
    return t * FS_PER_INTERNAL_TIME


def stress_to_gpa(stress):
    """Convert a stress or pressure from eV/Å³ to GPa."""
    return stress / GPA


def gpa_to_stress(p_gpa):
    """Convert a stress or pressure from GPa to eV/Å³."""
    return p_gpa * GPA


def stress_to_bar(stress):
    """Convert a stress or pressure from eV/Å³ to bar."""
    return stress / BAR


def bar_to_stress(p_bar):
    """Convert a stress or pressure from bar to eV/Å³."""
    return p_bar * BAR


def kinetic_temperature(kinetic_energy, degrees_of_freedom):
    """Temperature in K from a kinetic energy in eV: T = 2 KE / (dof k_B)."""
    return 2.0 * kinetic_energy / (degrees_of_freedom * KB)


#: eV/Å per amu to Å/fs²: acceleration a = F/m · FORCE_TO_ACCELERATION with velocities in Å/fs.
FORCE_TO_ACCELERATION = FS * FS
#: amu·Å²/fs² to eV: kinetic energy ½ m v² · MV2_TO_EV with velocities in Å/fs.
MV2_TO_EV = FS_PER_INTERNAL_TIME * FS_PER_INTERNAL_TIME
