"""The static pre-allocation every padded array is sized by."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Capacity:
    """How many systems, atoms and neighbors per atom a batch can hold.

    Every array of a run is padded to these sizes, so swapping systems in and
    out never changes a shape and never recompiles. ``max_neighbors`` is the
    width ``K`` of the dense ``(N, K)`` neighbor list; ``0`` means "estimate it
    from the structures and the cutoff" (see :func:`nvalchemi_jax.neighbors.allocate`).

    Example::

        >>> Capacity(num_systems=64, num_atoms=16_384, max_neighbors=96)
        Capacity(num_systems=64, num_atoms=16384, max_neighbors=96)
    """

    num_systems: int
    num_atoms: int
    max_neighbors: int = 0

    def __post_init__(self):
        for name in ("num_systems", "num_atoms", "max_neighbors"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))   # numpy ints become plain ints
            else:
                raise TypeError(f"Capacity.{name} must be an int, got {type(value).__name__}")
        if self.num_systems < 1:
            raise ValueError(f"Capacity.num_systems must be >= 1, got {self.num_systems}")
        if self.num_atoms < 1:
            raise ValueError(f"Capacity.num_atoms must be >= 1, got {self.num_atoms}")
        if self.max_neighbors < 0:
            raise ValueError(f"Capacity.max_neighbors must be >= 0, got {self.max_neighbors}")

    @classmethod
    def for_systems(cls, atoms_per_system: Sequence[int], headroom: float = 0.0,
                    max_neighbors: int = 0, atom_multiple: int = 32) -> "Capacity":
        """A capacity that fits systems of the given sizes.

        ``headroom`` is the fractional extra room (0.25 = 25 % more systems and
        atoms, useful when a sampler will swap in larger systems later); the
        atom count is rounded up to a multiple of ``atom_multiple`` so that
        nearby sizes share one compiled program.
        """
        sizes = [int(n) for n in atoms_per_system]
        if not sizes:
            raise ValueError("Capacity.for_systems: no systems given")
        if not headroom >= 0:
            raise ValueError(f"Capacity.for_systems: headroom must be >= 0, got {headroom}")
        if atom_multiple < 1:
            raise ValueError(f"Capacity.for_systems: atom_multiple must be >= 1, got {atom_multiple}")
        # Round before ceil so that e.g. 1600 * 1.1 does not become 1761.
        grow = lambda n: math.ceil(round(n * (1.0 + headroom), 9))
        num_systems = max(1, grow(len(sizes)))
        num_atoms = grow(sum(sizes))
        num_atoms = max(atom_multiple, -(-num_atoms // atom_multiple) * atom_multiple)
        return cls(num_systems, num_atoms, max_neighbors)

    def with_max_neighbors(self, max_neighbors: int) -> "Capacity":
        return dataclasses.replace(self, max_neighbors=int(max_neighbors))


#: nvalchemi's name for the same idea.
BufferConfig = Capacity
