"""What the fused GPU kernels (Pallas on Triton) share: when to use them, and masked
gathers / scatters through refs.

``NVALCHEMI_JAX_KERNELS``: ``auto`` (the kernels on GPUs, XLA elsewhere), ``pallas``
(always; off a GPU in Pallas' interpreter: slow, for tests) or ``xla`` (never).
"""

from __future__ import annotations

import os

import jax

MODES = ("auto", "pallas", "xla")


def mode() -> str:
    value = os.environ.get("NVALCHEMI_JAX_KERNELS", "auto")
    if value not in MODES:
        raise ValueError(f"NVALCHEMI_JAX_KERNELS must be one of {MODES}, got {value!r}")
    return value


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def wanted(n_atoms: int) -> bool:
    """Whether the fused kernels should run (read at trace time)."""
    m = mode()
    if m == "xla" or n_atoms == 0:
        return False
    return m == "pallas" or on_gpu()


def interpreted(interpret: bool | None) -> bool:
    """``interpret``, defaulting to: not on a GPU."""
    return (not on_gpu()) if interpret is None else interpret


def spare(interpret: bool) -> int:
    """Extra output entries that take the masked-out lanes of stores. A GPU skips those
    lanes; Pallas' interpreter writes every lane, so they need an address of their own
    (a dummy address inside the output would race with real entries)."""
    return 1 if interpret else 0


def call(kernel, out_shape, grid: int, num_warps: int, name: str, interpret: bool,
         num_stages: int = 1, aliases: dict | None = None):
    """``pl.pallas_call`` on a 1-D grid; ``aliases``: ``{input index: output index}``."""
    from jax.experimental import pallas as pl
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(grid,), compiler_params=params,
                          interpret=interpret, name=name, input_output_aliases=aliases or {})


def multiprocessors() -> int:
    """Streaming multiprocessors of the default GPU (0 when unknown or not a GPU)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 0) if on_gpu() else 0


def load(ref, index, mask, other):
    """Masked gather ``ref[index]`` (``other`` where ``mask`` is False; nothing is read there)."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[index], mask=mask, other=other)


def store(ref, index, value, mask):
    """Masked scatter ``ref[index] = value`` where ``mask``."""
    from jax.experimental.pallas import triton as plgpu
    plgpu.store(ref.at[index], value, mask=mask)


#: Spin-wait iterations of :func:`barrier` before it gives up (~1 s).
MAX_SPIN = 1 << 21


def barrier(counter, index, target, skip=None):
    """In a GPU kernel, a barrier among programs: arrive at ``counter[index]`` (an int32
    counter in global memory, zero at the start) and wait until it reaches ``target``;
    returns whether it did (False: gave up after ``MAX_SPIN`` spins, or did not wait because
    ``skip``). Needs every program it waits for running at once.

    The wait spins on plain loads (read through to L2): atomics from every waiting program
    would queue on the counter's address ahead of the last arrivals. One atomic read of the
    counter (acquire) then orders this program's later loads after every arrival it counted,
    so the other programs' writes before they arrived are visible from here on."""
    import jax.numpy as jnp
    from jax.experimental.pallas import triton as plgpu
    seen = plgpu.atomic_add(counter, index, jnp.int32(1)) + 1
    go = (lambda c: c) if skip is None else (lambda c: c & ~skip)
    waiting = lambda c: go((c[0] < target) & (c[1] < MAX_SPIN))
    at = jnp.full((1,), index, jnp.int32)
    spin = lambda c: (jnp.max(plgpu.load(counter.at[at], volatile=True)), c[1] + 1)
    seen, _ = jax.lax.while_loop(waiting, spin, (seen, jnp.int32(0)))
    seen = jnp.maximum(seen, plgpu.atomic_add(counter, index, jnp.int32(0)))
    return seen >= target
