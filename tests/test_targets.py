"""`jaxfusion.bench.targets`: compiling for TPU slices and GPU servers that this machine does
not have. The oracles are the published chip names and figures, and byte counts worked out
from the programs' shapes. TPU tests need libtpu, GPU tests JAX's CUDA plugin (and
JAX_PLATFORMS=cpu on a machine without a GPU); each is skipped, saying so, where its compiler
is not installed. Every program is tiny or made of `ShapeDtypeStruct`s: nothing runs."""

import importlib.util
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfusion.bench.targets import (
    GIB,
    TARGETS,
    ProgramTooLarge,
    compile_for,
    devices,
    mesh,
    peak_memory_bytes,
    target,
)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_LIBTPU = installed("libtpu")
HAS_CUDA_PLUGIN = installed("jax_plugins.xla_cuda12") or installed("jax_plugins.xla_cuda13")
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed: pip install 'jaxfusion[targets]'"
)
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN,
    reason="JAX's CUDA plugin is not installed: pip install 'jaxfusion[targets]'",
)

TPU_TARGETS = [name for name, t in TARGETS.items() if t.platform == "tpu"]
GPU_TARGETS = [name for name, t in TARGETS.items() if t.platform == "cuda"]

# The device kind each compiler reports for the chip (TPU: its own names, v5e is "v5 lite").
DEVICE_KIND = {
    "v5e-8": "TPU v5 lite",
    "v6e-8": "TPU v6 lite",
    "v5p-16": "TPU v5",
    "v4-16": "TPU v4",
    "h100-8": "NVIDIA H100 80GB HBM3",
    "a100-8": "NVIDIA A100-SXM4-80GB",
}

# Per device: a (ROWS, WIDTH) bfloat16 patch of x, and the replicated (WIDTH, WIDTH) w.
ROWS, WIDTH, BF16_BYTES = 256, 512, 2


def gather_matmul_program(t):
    """Lowered for `t`: each of 8 devices gathers everyone's patch and multiplies its own."""
    m = mesh(t, (8,), ("patch",))

    def per_device(x, w):
        gathered = jax.lax.all_gather(x, "patch")
        return x @ w + gathered.sum(0)

    def program(x, w):
        return jax.shard_map(per_device, mesh=m, in_specs=(P("patch"), P()), out_specs=P("patch"))(
            x, w
        )

    x = jax.ShapeDtypeStruct((8 * ROWS, WIDTH), jnp.bfloat16, sharding=NamedSharding(m, P("patch")))
    w = jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.bfloat16, sharding=NamedSharding(m, P()))
    return jax.jit(program).lower(x, w)


def summing_program(t, bytes_per_chip: int):
    """Lowered for `t`: the sum of a bfloat16 array of `bytes_per_chip` bytes on each chip."""
    m = mesh(t, (8,), ("patch",))
    rows = bytes_per_chip // (1024 * BF16_BYTES)
    x = jax.ShapeDtypeStruct((8 * rows, 1024), jnp.bfloat16, sharding=NamedSharding(m, P("patch")))
    return jax.jit(lambda x: x.sum()).lower(x)


def assert_gather_matmul_memory(compiled):
    stats = compiled.memory_analysis()
    assert stats is not None
    argument_bytes = ROWS * WIDTH * BF16_BYTES + WIDTH * WIDTH * BF16_BYTES
    output_bytes = ROWS * WIDTH * BF16_BYTES
    assert stats.argument_size_in_bytes == argument_bytes
    assert stats.output_size_in_bytes == output_bytes
    assert peak_memory_bytes(compiled) >= argument_bytes + output_bytes


def test_unknown_target_lists_the_names():
    with pytest.raises(ValueError) as error:
        target("v5e-4")
    for name in ("v5e-8", "v6e-8", "v5p-16", "v4-16", "h100-8", "a100-8"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="v5p-16"):
        target("v5p-8")  # Google's v5p-8 is 4 chips


def test_every_target_has_eight_chips_and_its_published_figures():
    published = {  # dense bfloat16 TFLOP/s per chip, interconnect GB/s received per chip
        "v5e-8": (197, 200),
        "v6e-8": (918, 400),
        "v5p-16": (459, 600),
        "v4-16": (275, 300),
        "h100-8": (989, 450),
        "a100-8": (312, 300),
    }
    assert set(TARGETS) == set(published)
    for name, (tflops, link) in published.items():
        t = target(name)
        assert (t.name, t.chips, t.peak_tflops, t.link_gbs) == (name, 8, tflops, link)


def test_gpu_specs_are_package_data_and_agree_with_the_targets():
    published = {"h100-8": (132, 9, 1.98), "a100-8": (108, 8, 1.41)}  # SMs, compute cap., GHz
    for name, (sms, major, ghz) in published.items():
        t = target(name)
        spec = t.gpu_spec_text()
        assert spec.startswith("#")  # names its sources
        assert f"core_count: {sms}\n" in spec
        assert re.search(rf"cuda_compute_capability {{\s*major: {major}\s", spec)
        assert f"clock_rate_ghz: {ghz}\n" in spec
        assert f"device_memory_size: {t.hbm_bytes}\n" in spec
        assert f'device_description_str: "{DEVICE_KIND[name]}"' in spec


def test_mesh_refuses_more_devices_than_chips():
    with pytest.raises(ValueError, match="16 devices; v5e-8 has 8 chips"):
        mesh(target("v5e-8"), (2, 8), ("cfg", "patch"))


def test_peak_memory_is_the_compilers_else_the_sum_of_buffers():
    def compiled(peak):
        stats = SimpleNamespace(
            peak_memory_in_bytes=peak,
            argument_size_in_bytes=1000,
            output_size_in_bytes=300,
            temp_size_in_bytes=50,
            alias_size_in_bytes=200,
        )
        return SimpleNamespace(memory_analysis=lambda: stats)

    assert peak_memory_bytes(compiled(4096)) == 4096
    assert peak_memory_bytes(compiled(0)) == 1000 + 300 + 50 - 200


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_missing_libtpu_says_how_to_install_it():
    with pytest.raises(RuntimeError, match=r"pip install 'jaxfusion\[targets\]'"):
        devices(target("v5e-8"))


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed")
def test_missing_cuda_plugin_says_how_to_install_it():
    with pytest.raises(RuntimeError, match=r"pip install 'jaxfusion\[targets\]'"):
        devices(target("h100-8"))


@needs_libtpu
@pytest.mark.parametrize("name", TPU_TARGETS)
def test_tpu_topology_has_one_device_per_chip(name):
    found = devices(target(name))
    assert len(found) == target(name).chips == 8
    assert {d.device_kind for d in found} == {DEVICE_KIND[name]}
    assert len({tuple(d.coords) for d in found}) == 8  # 8 chips, not 4 chips' 8 TensorCores


@pytest.fixture(scope="module")
def v5e_gather_matmul():
    return compile_for(target("v5e-8"), gather_matmul_program(target("v5e-8")))


@needs_libtpu
def test_v5e_program_has_memory_analysis_and_its_argument_bytes(v5e_gather_matmul):
    assert_gather_matmul_memory(v5e_gather_matmul)
    assert "all-gather" in v5e_gather_matmul.as_text()


@needs_libtpu
def test_v5e_refuses_a_program_larger_than_its_hbm():
    with pytest.raises(ProgramTooLarge) as error:
        compile_for(target("v5e-8"), summing_program(target("v5e-8"), 17 * GIB))
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "v5e-8" in message and "15.75 GiB of HBM" in message
    assert "more devices" in message and "cfg parallel" in message
    assert error.value.needed_bytes >= 16.99 * GIB  # the compiler's rounded figure


@pytest.fixture(scope="module", params=GPU_TARGETS)
def gpu_gather_matmul(request):
    t = target(request.param)
    return t, compile_for(t, gather_matmul_program(t))


@needs_cuda_plugin
def test_gpu_spec_compiles_a_small_program(gpu_gather_matmul):
    t, compiled = gpu_gather_matmul
    assert {d.device_kind for d in devices(t)} == {DEVICE_KIND[t.name]}
    assert_gather_matmul_memory(compiled)
    assert "all-gather-start" in compiled.as_text()


@needs_cuda_plugin
def test_h100_refuses_a_program_larger_than_its_hbm():
    with pytest.raises(ProgramTooLarge) as error:
        compile_for(target("h100-8"), summing_program(target("h100-8"), 90 * GIB))
    assert "h100-8" in str(error.value) and "79.11 GiB of HBM" in str(error.value)
    assert error.value.needed_bytes >= 90 * GIB
