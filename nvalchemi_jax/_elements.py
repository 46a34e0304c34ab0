"""Chemical element symbols and standard atomic masses, indexed by atomic number.

Masses (amu) are the IUPAC conventional standard atomic weights. For elements
without stable isotopes the mass number of the longest-lived known isotope is
used. Index 0 is a dummy entry ('X', mass 1.0).
"""

import numpy as np

MAX_ATOMIC_NUMBER = 118

SYMBOLS: tuple[str, ...] = (
    "X",
    "H", "He",
    "Li", "Be", "B", "C", "N", "O", "F", "Ne",
    "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
    "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Ga", "Ge", "As", "Se", "Br", "Kr",
    "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe",
    "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy",
    "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt",
    "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn",
    "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf",
    "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds",
    "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)

STANDARD_ATOMIC_MASSES: np.ndarray = np.array(
    [
        1.0,  # X (dummy)
        1.008, 4.002602,  # H, He
        6.94, 9.0121831, 10.81, 12.011, 14.007, 15.999, 18.998403163, 20.1797,
        22.98976928, 24.305, 26.9815384, 28.085, 30.973761998, 32.06, 35.45,
        39.948,
        39.0983, 40.078, 44.955908, 47.867, 50.9415, 51.9961, 54.938044,
        55.845, 58.933194, 58.6934, 63.546, 65.38,
        69.723, 72.630, 74.921595, 78.971, 79.904, 83.798,
        85.4678, 87.62, 88.90584, 91.224, 92.90637, 95.95, 97.0, 101.07,
        102.90549, 106.42, 107.8682, 112.414,
        114.818, 118.710, 121.760, 127.60, 126.90447, 131.293,
        132.90545196, 137.327, 138.90547, 140.116, 140.90766, 144.242, 145.0,
        150.36, 151.964, 157.25, 158.92535, 162.500, 164.93033, 167.259,
        168.93422, 173.045, 174.9668, 178.49, 180.94788, 183.84, 186.207,
        190.23, 192.217, 195.084, 196.966569, 200.592, 204.38, 207.2,
        208.98040, 209.0, 210.0, 222.0,
        223.0, 226.0, 227.0, 232.0377, 231.03588, 238.02891, 237.0, 244.0,
        243.0, 247.0, 247.0, 251.0, 252.0, 257.0, 258.0, 259.0, 266.0,
        267.0, 268.0, 269.0, 270.0, 269.0, 278.0, 281.0,
        282.0, 285.0, 286.0, 289.0, 290.0, 293.0, 294.0, 294.0,
    ],
    dtype=np.float64,
)

_SYMBOL_TO_Z = {s: z for z, s in enumerate(SYMBOLS)}


def atomic_number(symbol: str) -> int:
    """Return the atomic number for a chemical symbol (e.g. 'Ar' -> 18)."""
    try:
        return _SYMBOL_TO_Z[symbol]
    except KeyError:
        raise ValueError(f"Unknown chemical symbol: {symbol!r}") from None
