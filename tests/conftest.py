"""Eight simulated CPU devices for the patch-parallel tests (set before JAX starts its
backends); single-device tests use the first.

PyTorch (the reference side of the parity tests, here and in the subprocesses the tests
start) runs one thread: the models are tiny, and on a busy 2-core machine OpenMP threads
that wait on each other made its tests 10x slower (120 s instead of 9 s for part of
`test_distrifusion_reference.py`). Set OMP_NUM_THREADS yourself to choose otherwise.

The whole session, all its pytest-xdist workers, shares one JAX compilation cache (a fresh
folder per session): tests that build the same tiny pipelines compile the same programs, and
every program after the first comes from the cache.

XLA compiles the suite's tiny programs for longer than it runs them, so the suite, and the
subprocesses it starts, ask LLVM for its first optimisation level instead of its default
second, without its expensive passes (XLA_FLAGS, set before JAX starts its backends; no
fast math): the level alone took about 30% off the CPU time of a test that compiles
4-device programs; without the expensive passes the whole suite (`python -m pytest -q`,
2 workers on this project's 2-core machine) ran in 26:34 against 28:31, 46.6 against
51.8 CPU-minutes."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool
# The suite runs on CPU; with libtpu installed (the test extras bring it, to compile for TPU
# targets) JAX would otherwise try to start a TPU and print pages about the chip it lacks.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1"
    " --xla_llvm_disable_expensive_passes=true"
)

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


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """The tiny random pipelines in both frameworks (`pipelines.Backends`), one set per
    module."""
    from pipelines import Backends

    return Backends(tmp_path_factory)


# The modules whose tests take longest, longest first (`--durations=100` of a clean-clone
# `.ci/run`, summed per module): they start first, so that the run does not end on one of
# them alone while the other workers idle. The others follow in collection order.
# pyproject.toml passes --no-loadscope-reorder, without which pytest-xdist orders modules by
# their test count.
LONGEST_FIRST = (
    "test_parallel.py",
    "test_distributed.py",
    "test_cli.py",
    "test_codecs.py",
    "test_train.py",
    "test_bench.py",
    "test_refiner.py",
    "test_unet_parity.py",
    "test_notebook.py",
    "test_builtin_model.py",
    "test_pipelines.py",
    "test_img2img.py",
    "test_patch_decode.py",
    "test_data_parallel.py",
    "test_features_parallel.py",
    "test_lora.py",
    "test_attention.py",
    "test_bench_time.py",
    "test_eval.py",
    "test_few_step.py",
    "test_profile.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: each module's tests keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
