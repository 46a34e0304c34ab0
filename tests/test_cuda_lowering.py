"""Every fused GPU kernel lowers for CUDA, checked on a machine without one.

Pallas turns a kernel into a Triton module when the program is lowered; XLA parses and
verifies it only when it compiles on a GPU, so an op Triton rejects (an atomic given a
boolean, say) used to surface on the device, where a failed check costs the measurement
it guards. Here each chunk program (resident, split over programs, leapfrog steps in XLA,
the persistent kernel) is lowered for CUDA as if on an H200 (132 multiprocessors), and
MLIR's verifier runs on every Triton module it produces.
"""

from __future__ import annotations

import jax
import pytest

from nvalchemi_jax import _pallas
from nvalchemi_jax.dynamics import NVE
from nvalchemi_jax.dynamics.run import chunk_steps, fused_paths
from nvalchemi_jax.models import LennardJones

from _helpers import ARGON, argon_batch


def pretend_to_be_on_a_gpu(monkeypatch):
    """From here on: fused kernels compiled for a GPU of 132 multiprocessors, every Triton
    module verified as it is lowered (the returned list collects where each kernel's source
    is)."""
    from jax._src.pallas.triton import pallas_call_registration as registration
    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def verified(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        result.module.operation.verify()        # raises on an invalid Triton module
        modules.append(str(getattr(jaxpr, "debug_info", "")))   # names the kernel's source
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", verified)
    monkeypatch.setattr(_pallas, "on_gpu", lambda: True)
    monkeypatch.setattr(_pallas, "multiprocessors", lambda: 132)
    return modules


@pytest.mark.parametrize("case", ["resident", "split", "leapfrog", "persistent"])
def test_chunk_lowers_for_cuda(case, monkeypatch):
    for name in ("NVALCHEMI_JAX_KERNELS", "NVALCHEMI_JAX_RESIDENT", "NVALCHEMI_JAX_RESIDENT_PARTS",
                 "NVALCHEMI_JAX_LEAPFROG", "NVALCHEMI_JAX_PERSISTENT"):
        monkeypatch.delenv(name, raising=False)
    repeats = [(4, 4, 4)] * (133 if case == "resident" else 1)    # 133: too many to split
    if case in ("leapfrog", "persistent"):
        repeats = [(6, 6, 6)]
        monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT", "0")
        monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "1" if case == "persistent" else "0")
    batch = argon_batch(repeats=repeats)
    md = NVE(model=LennardJones(**ARGON, shift=True), dt=5.0, n_steps=100)
    state = md.init(batch)                  # here, by the XLA forms
    modules = pretend_to_be_on_a_gpu(monkeypatch)
    path = fused_paths(md, batch)
    expected = {"resident": path["resident"] and not path["parts"], "split": path["parts"] > 1,
                "leapfrog": path["fused"] and not path["grid"], "persistent": path["grid"] > 1}
    assert expected[case], path
    chunk = jax.jit(chunk_steps, static_argnames=("length", "resident", "fused", "parts", "grid"))
    chunk.trace(md, state, batch, 10, length=10, **path).lower(lowering_platforms=("cuda",))
    kernel = {"resident": "resident.py", "split": "resident.py", "leapfrog": "pair_kernel.py",
              "persistent": "persistent.py"}[case]
    assert any(kernel in source for source in modules), modules
