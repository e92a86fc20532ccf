"""Accelerators to compile for without having them: deviceless ahead-of-time compilation.

JAX can compile a program for a real accelerator topology on a CPU-only machine: the TPU
compiler (libtpu) or XLA's GPU compiler (JAX's CUDA plugin, given a GPU target spec) builds
the executable that those chips would run, and `memory_analysis()` and the scheduled HLO
(`as_text()`) of that executable say how much memory each chip needs and whether the
collectives overlap compute (DESIGN.md section 12). Nothing runs.

- `TARGETS` / `target(name)`: the 8-chip slices and servers this module knows, with the
  published figures the cost models need (HBM, peak bfloat16 throughput, interconnect).
- `devices(target)`: the topology's devices; `mesh(target, shape, axis_names)`: a mesh on them.
- `compile_for(target, lowered)`: compiles, and refuses a program that does not fit in the
  chip's HBM with a `ProgramTooLarge` (a `ValueError`); `peak_memory_bytes(compiled)`.

Lower with `jax.ShapeDtypeStruct`s whose `NamedSharding`s are on `mesh(...)`:

    v5e = target("v5e-8")
    sharding = NamedSharding(mesh(v5e, (8,), ("patch",)), P("patch"))
    x = jax.ShapeDtypeStruct((8 * 1024, 1024), jnp.bfloat16, sharding=sharding)
    compiled = compile_for(v5e, jax.jit(f).lower(x))

Requirements: `pip install 'jaxfusion[targets]'` (libtpu, JAX's CUDA plugin). On a machine
without a GPU, the CUDA plugin only lends its compiler when `JAX_PLATFORMS=cpu` is set before
JAX starts its backends (otherwise it fails to start and is dropped); TPU targets need no
such setting.
"""

import os

# libtpu takes a lock file (/tmp/libtpu_lockfile) so that two processes do not drive the same
# TPU chips; a second process that loads it, say a second pytest-xdist worker or a second
# `jaxfusion` command compiling for a TPU target, then fails with "Internal error when
# accessing libtpu multi-process lockfile". This module only compiles (no chip is touched),
# so it allows several loads, unless the user chose otherwise; set before libtpu loads, which
# is on the first `devices()` of a TPU target at the latest.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from importlib import resources

import jax
import numpy as np
from jax.experimental import topologies

GIB = 2**30

INSTALL_HINT = "install with pip install 'jaxfusion[targets]'"

# The package and folder of the GPU target specs (XLA's GpuTargetConfigProto, as text).
GPU_SPEC_PACKAGE, GPU_SPEC_FOLDER = "jaxfusion.bench", "gpu_targets"

# JAX's CUDA plugins (jax-cuda12-plugin, jax-cuda13-plugin), by module name.
CUDA_PLUGIN_MODULES = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


@dataclass(frozen=True)
class Target:
    """One accelerator slice or server to compile for, and its published figures per chip.

    `name`: the name users give (`target(name)`). TPU names follow Google's Cloud TPU
    accelerator types: the number counts TensorCores, so `v5e-8` and `v6e-8` (one TensorCore
    per chip) are 8 chips, and `v5p-16` and `v4-16` (two per chip, one device in megacore
    mode) are 8 chips too. `platform`: "tpu" or "cuda". `chips`: devices in the topology,
    one per chip. `chip`: the chip's name for people.

    `hbm_bytes`: memory per chip in bytes that a program may use. TPU: the "available HBM"
    that the TPU compiler enforces and reports when it refuses a program (less than the
    chip's 16/32/95/32 GiB: the runtime keeps some; the program's own code, about 2 MiB,
    counts against it too). GPU: the part of the 80 GB that the CUDA
    runtime reports as total global memory (the spec file's `device_memory_size`); XLA's GPU
    compiler does not enforce it, `compile_for` does.

    `peak_tflops`: dense bfloat16 peak per chip, in 10^12 floating-point operations per
    second, as the vendor publishes it (for NVIDIA, without 2:4 sparsity).

    `link_gbs`: bytes per second, in 10^9 (GB/s), that one chip can receive from the others
    over the interconnect during a collective among them: one direction of the chip's
    published interconnect bandwidth. NVIDIA: NVLink 4 (H100) is 900 GB/s per GPU counting
    both directions, 450 GB/s each way; NVLink 3 (A100) 600, so 300 each way; through the
    NVSwitches of an 8-GPU server, a GPU can receive that much from any mix of the others.
    TPU: Google's per-chip ICI figure (Cloud TPU documentation), the sum over the chip's
    ports: v5e 400 GB/s bidirectional (1,600 Gbps one way) -> 200; v6e 800 GB/s bidirectional
    -> 400 (an earlier table said 3,584 Gbps, 448 GB/s); v5p 1,200 GB/s bidirectional (4,800
    Gbps) -> 600; v4 2,400 Gbps, taken as one way like the others -> 300. On TPU this is an
    upper bound: a 2x4 (v5e, v6e) or 2x2x2 (v5p, v4) slice has no wraparound links, so each
    chip has links to only 2 or 3 of the neighbours its ports could serve.

    How to get the topology: `topology` is TPU's topology name ("v5e:2x4") for TPU, or the
    CUDA plugin's "slices x hosts per slice x devices per host" ("1x1x8") for GPU; `chip_config` is
    TPU's `chip_config_name` ("megacore": one device per two-TensorCore chip), else None;
    `gpu_spec` is the file name of the GPU target spec in `jaxfusion/bench/gpu_targets/`.
    """

    name: str
    platform: str
    chips: int
    chip: str
    hbm_bytes: int
    peak_tflops: float
    link_gbs: float
    topology: str
    chip_config: str | None = None
    gpu_spec: str | None = None

    @property
    def compiler_options(self) -> dict[str, bool]:
        """Options for compiling without the chip. XLA:GPU picks Triton GEMM tiles by
        autotuning on a device; without one, its default tiles fail for some float32 dots of
        SDXL at 3840x3840 ("Couldn't find output tile sizes"), so GPU targets take cuBLAS
        for every matmul, as XLA:GPU does where Triton is off."""
        return {"xla_gpu_enable_triton_gemm": False} if self.platform == "cuda" else {}

    def gpu_spec_text(self) -> str:
        """The GPU target spec (XLA's GpuTargetConfigProto as text) of a CUDA target."""
        if self.gpu_spec is None:
            raise ValueError(f"{self.name} is a {self.platform} target: it has no GPU spec")
        return (resources.files(GPU_SPEC_PACKAGE) / GPU_SPEC_FOLDER / self.gpu_spec).read_text()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="v5e-8",
            platform="tpu",
            chips=8,
            chip="TPU v5e",
            hbm_bytes=round(15.75 * GIB),
            peak_tflops=197.0,
            link_gbs=200.0,
            topology="v5e:2x4",
        ),
        Target(
            name="v6e-8",
            platform="tpu",
            chips=8,
            chip="TPU v6e (Trillium)",
            hbm_bytes=round(31.25 * GIB),
            peak_tflops=918.0,
            link_gbs=400.0,
            topology="v6e:2x4",
        ),
        Target(
            name="v5p-16",
            platform="tpu",
            chips=8,
            chip="TPU v5p",
            hbm_bytes=round(95.74 * GIB),
            peak_tflops=459.0,
            link_gbs=600.0,
            topology="v5p:2x2x2",
            chip_config="megacore",
        ),
        Target(
            name="v4-16",
            platform="tpu",
            chips=8,
            chip="TPU v4",
            hbm_bytes=round(30.75 * GIB),
            peak_tflops=275.0,
            link_gbs=300.0,
            topology="v4:2x2x2",
            chip_config="megacore",
        ),
        Target(
            name="h100-8",
            platform="cuda",
            chips=8,
            chip="NVIDIA H100 SXM",
            hbm_bytes=84_942_979_072,
            peak_tflops=989.0,
            link_gbs=450.0,
            topology="1x1x8",
            gpu_spec="h100_sxm.txtpb",
        ),
        Target(
            name="a100-8",
            platform="cuda",
            chips=8,
            chip="NVIDIA A100 SXM 80GB",
            hbm_bytes=85_100_068_864,
            peak_tflops=312.0,
            link_gbs=300.0,
            topology="1x1x8",
            gpu_spec="a100_sxm_80.txtpb",
        ),
    )
}

# Google's names for half of these slices (4 chips), which users may type for 8 chips.
_FOUR_CHIP_NAMES = {"v5p-8": "v5p-16", "v4-8": "v4-16"}


def target(name: str) -> Target:
    """The target called `name` (a key of `TARGETS`); a ValueError that lists them if none."""
    if name in TARGETS:
        return TARGETS[name]
    known = ", ".join(TARGETS)
    if name in _FOUR_CHIP_NAMES:
        raise ValueError(
            f"{name} is Google's name for 4 chips (8 TensorCores); the 8-chip slice is "
            f"{_FOUR_CHIP_NAMES[name]}. Targets: {known}"
        )
    raise ValueError(f"unknown target {name!r}; targets: {known}")


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _tpu_topology(t: Target):
    if not _module_installed("libtpu"):
        raise RuntimeError(f"{t.name} needs the TPU compiler (libtpu): {INSTALL_HINT}")
    options = {} if t.chip_config is None else {"chip_config_name": t.chip_config}
    return topologies.get_topology_desc(topology_name=t.topology, platform="tpu", **options)


def _cuda_topology(t: Target):
    if not any(_module_installed(m) for m in CUDA_PLUGIN_MODULES):
        raise RuntimeError(f"{t.name} needs JAX's CUDA plugin: {INSTALL_HINT}")
    try:
        return topologies.get_topology_desc(
            t.name, "cuda", target_config=t.gpu_spec_text(), topology=t.topology
        )
    except NotImplementedError as error:  # "topology not implemented for cuda"
        from jax._src import xla_bridge

        started = (
            " JAX has already started its backends in this process, so start a new one."
            if xla_bridge.backends_are_initialized()
            else ""
        )
        raise RuntimeError(
            f"{t.name}: JAX's CUDA plugin is installed but did not start (on a machine "
            "without a GPU it starts only for compiling, and only when JAX_PLATFORMS=cpu is "
            "set before JAX starts its backends; here JAX_PLATFORMS is "
            f"{jax.config.jax_platforms or 'unset'}). Set it in the environment, e.g. "
            f"`JAX_PLATFORMS=cpu jaxfusion ...`.{started}"
        ) from error


@functools.cache
def devices(t: Target) -> list:
    """The devices of `t`'s topology, one per chip (loaded once per target and process).
    RuntimeError, on one line, when libtpu or JAX's CUDA plugin is missing or did not start."""
    topology = _tpu_topology(t) if t.platform == "tpu" else _cuda_topology(t)
    found = list(topology.devices)
    if len(found) != t.chips:
        raise RuntimeError(
            f"{t.name}: topology {t.topology} has {len(found)} devices, not {t.chips}"
        )
    return found


def mesh(t: Target, shape: tuple[int, ...], axis_names: tuple[str, ...]) -> jax.sharding.Mesh:
    """A mesh of `shape` (axes named `axis_names`) on the first prod(shape) devices of `t`, in
    the topology's order; ValueError when that is more devices than `t` has chips."""
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} and axis names {axis_names} differ in length")
    count = math.prod(shape)
    if not 1 <= count <= t.chips:
        raise ValueError(
            f"a mesh of shape {shape} needs {count} devices; {t.name} has {t.chips} chips"
        )
    return jax.sharding.Mesh(np.array(devices(t)[:count]).reshape(shape), axis_names)


class ProgramTooLarge(ValueError):
    """A program that needs more memory per chip than a target's HBM.

    `needed_bytes`: what the program needs per chip, in bytes (None when the TPU compiler
    refused it without saying); `hbm_bytes`: the target's `hbm_bytes`."""

    def __init__(self, message: str, needed_bytes: int | None, hbm_bytes: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.hbm_bytes = hbm_bytes


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _too_large(t: Target, needed_bytes: int | None) -> ProgramTooLarge:
    needs = "more" if needed_bytes is None else _gib(needed_bytes)
    return ProgramTooLarge(
        f"the program needs {needs} per chip on {t.name}, whose {t.chip} has {_gib(t.hbm_bytes)} "
        "of HBM; try fewer bytes per device: more devices, cfg parallel (the two halves of "
        "classifier-free guidance on different devices) or a smaller image",
        needed_bytes,
        t.hbm_bytes,
    )


# XLA's human-readable byte counts ("50.00G"): binary multiples.
_UNIT_BYTES = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_REQUIRED_PATTERNS = (
    # "the total memory required for HLO temporaries (50.00G) exceeds available HBM (15.75G)"
    re.compile(rf"memory required for [^(]*\({_SIZE}\)"),
    # "Used 20.00G of 15.75G hbm"
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
)


def compiler_reported_bytes(message: str) -> int | None:
    """The memory a program needs, in bytes, as the TPU compiler's out-of-memory message
    states it (XLA's rounded binary units), or None if the message does not say."""
    for pattern in _REQUIRED_PATTERNS:
        found = pattern.search(message)
        if found:
            return round(float(found.group(1)) * _UNIT_BYTES[found.group(2)])
    return None


def _is_out_of_memory(message: str) -> bool:
    return "CompileTimeHbmOom" in message or (
        "RESOURCE_EXHAUSTED" in message and "memory" in message.lower()
    )


def peak_memory_bytes(compiled: jax.stages.Compiled) -> int:
    """Peak memory per device of a compiled program, in bytes: the compiler's
    `peak_memory_in_bytes` where it gives one (> 0), else arguments + outputs + temporaries -
    aliased (outputs that reuse argument buffers)."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError("this compiler gives no memory analysis")
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    if peak > 0:
        return int(peak)
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def compile_for(t: Target, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered` (lowered on `mesh(t, ...)`) compiled for `t`. ProgramTooLarge (a ValueError)
    when it needs more memory per chip than `t.hbm_bytes`: the TPU compiler refuses such a
    program itself; XLA's GPU compiler does not, so for GPU targets `peak_memory_bytes` of
    the result is compared with `t.hbm_bytes` here."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        message = str(error)
        if t.platform == "tpu" and _is_out_of_memory(message):
            raise _too_large(t, compiler_reported_bytes(message)) from error
        raise
    if t.platform != "tpu":
        needed = peak_memory_bytes(compiled)
        if needed > t.hbm_bytes:
            raise _too_large(t, needed)
    return compiled
