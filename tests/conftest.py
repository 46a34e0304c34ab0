"""Test configuration: float64 on request, a --runslow switch for the long physics runs."""

import os

# One BLAS thread: ASE's filters call small LAPACK routines that crawl when OpenBLAS
# threads compete for the two cores of the CI machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


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
