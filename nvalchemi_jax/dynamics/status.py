"""Per-system status codes and failure reasons.

``state.status[s]`` is a stage code ``0, 1, ...`` while system ``s`` runs
(a single dynamics uses code 0 and moves converged systems to 1, its exit
code), :data:`EMPTY` for an empty slot, or :data:`FAILED`. A failed system's
``state.failure[s]`` says why (:class:`Failure`); it is frozen at its last
finite configuration and never updated again, while its batch mates go on.
"""

import enum

EMPTY = -1
FAILED = -2


class Failure(enum.IntEnum):
    """Why a system failed; :func:`message` gives the sentence for each."""

    NONE = 0
    NONFINITE_ENERGY = 1
    NONFINITE_FORCES = 2
    NONFINITE_POSITIONS = 3
    NONFINITE_STRESS = 4
    NONFINITE_CELL = 5
    DETECTED_BY_HOOK = 6
    KERNEL_BARRIER = 7


_MESSAGES = {
    Failure.NONE: "no failure",
    Failure.NONFINITE_ENERGY: "the model returned a non-finite energy",
    Failure.NONFINITE_FORCES: "the model returned non-finite forces",
    Failure.NONFINITE_POSITIONS: "positions or velocities became non-finite",
    Failure.NONFINITE_STRESS: "the model returned a non-finite stress",
    Failure.NONFINITE_CELL: "the cell became non-finite or singular",
    Failure.DETECTED_BY_HOOK: "a hook marked the system failed",
    Failure.KERNEL_BARRIER: ("the persistent GPU kernel's programs did not all run at once "
                             "(set NVALCHEMI_JAX_PERSISTENT=0)"),
}


def message(reason: int) -> str:
    """A sentence for a failure code (unknown codes are named as such)."""
    try:
        return _MESSAGES[Failure(int(reason))]
    except ValueError:
        return f"unknown failure code {int(reason)}"
