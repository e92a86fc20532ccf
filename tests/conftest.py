"""Eight simulated CPU devices for the patch-parallel tests (set before JAX starts its
backends); single-device tests use the first.

PyTorch (the reference side of the parity tests, here and in the subprocesses the tests
start) runs one thread: the models are tiny, and on a busy 2-core machine OpenMP threads
that wait on each other made its tests 10x slower (120 s instead of 9 s for part of
`test_distrifusion_reference.py`). Set OMP_NUM_THREADS yourself to choose otherwise.

The whole session, all its pytest-xdist workers, shares one JAX compilation cache (a fresh
folder per session): tests that build the same tiny pipelines compile the same programs, and
every program after the first comes from the cache."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One cache for the session; under pytest-xdist, one for all its workers (the folder
    above each worker's own temporary folder)."""
    from jaxfusion.compilation_cache import enable_compilation_cache

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    enable_compilation_cache(root / "xla-cache")
