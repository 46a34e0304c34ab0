"""Test configuration: float64 on request, a --runslow switch for the long physics runs,
and what keeps the suite's compile time down (LLVM's lowest level, a disk cache)."""

import importlib.util
import os

# One BLAS thread: ASE's filters call small LAPACK routines that crawl when OpenBLAS
# threads compete for the two cores of the CI machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# On a CPU-only run, the backend's LLVM passes at their lowest level: the tests' small
# systems spend far more time compiling than running (the suite on 2 cores: 1,022 -> 738 s,
# with the cache below; a fused relax -> MD test alone: 64 -> 52 s). Fast math stays off
# (XLA's default), and the suite passes at both levels; set the flag yourself to test at
# another level. Not with a GPU: the flag would apply to the GPU backend too.
_gpu_plugin = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
if (not _gpu_plugin and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu")
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Compiled programs go to a disk cache shared by the session's test files and xdist workers:
# each file starts with empty in-memory caches (below), and many compile the same programs
# (a fresh clone starts with an empty cache; `count_compilations` counts its hits too, as
# JAX records a backend compilation for them).
# Executables that call back into Python are never cached by JAX. The cache grows with each
# code change (nothing is evicted): delete .jax_cache/ now and then.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the long physics tests marked @pytest.mark.slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long run: use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop compiled programs after each test file: a long session otherwise accumulates
    thousands of executables (and once crashed XLA's CPU compiler in CI)."""
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    """Run the test with JAX's float64 mode on (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["float32", "float64"])
def precision(request):
    """Run the test in both precisions; yields the name."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param
