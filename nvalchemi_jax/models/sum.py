"""A sum of models sharing one neighbor list."""

from __future__ import annotations

from flax import struct

from nvalchemi_jax.models.base import Composable


@struct.dataclass
class SumModel(Composable):
    """E = Σ_m E_m; the cutoff is the largest of the parts (each part still applies
    its own cutoff to the shared list). ``a + b`` builds one from any two models.

    Example::

        >>> model = SumModel((LennardJones(sigma=3.4, epsilon=0.0104, cutoff=8.5),
        ...                   SoftSphere(sigma=2.5, epsilon=1.0)))
    """

    models: tuple

    @property
    def cutoff(self) -> float:
        return max(float(m.cutoff) for m in self.models)

    def check(self, batch) -> None:
        for m in self.models:
            if hasattr(m, "check"):
                m.check(batch)

    def energy(self, positions, cell, batch, neighbors):
        total = self.models[0].energy(positions, cell, batch, neighbors)
        for m in self.models[1:]:
            total = total + m.energy(positions, cell, batch, neighbors)
        return total


    def evaluate(self, positions, cell, batch, neighbors, forces=True, stress=False):
        """Each part by its own fastest route (closed form or autodiff), summed."""
        from nvalchemi_jax.models.base import ModelOutput, compute
        outs = [compute(m, positions, cell, batch, neighbors, forces=forces, stress=stress)
                for m in self.models]
        total = lambda xs: None if xs[0] is None else sum(xs[1:], xs[0])
        return ModelOutput(energy=total([o.energy for o in outs]),
                           forces=total([o.forces for o in outs]),
                           stress=total([o.stress for o in outs]))


def add(a, b) -> SumModel:
    """``a + b`` for models: flattens nested sums."""
    parts = lambda m: m.models if isinstance(m, SumModel) else (m,)
    return SumModel(parts(a) + parts(b))
