"""`jaxfusion.bench.schedule`: the reader of XLA's scheduled HLO. Tiny programs compiled for
8 TPU v5e chips (libtpu), 8 H100s (JAX's CUDA plugin, with JAX_PLATFORMS=cpu) and the 8
simulated CPU devices; each accelerator's tests are skipped, saying so, where its compiler is
not installed. The oracles: the compiler's own `cost_analysis()` FLOPs, and FLOPs and bytes
worked out from the programs' shapes (2 m n k for a matmul; (n - 1) / n of an all-gather's
result; ...). Nothing runs: every program is compiled from `ShapeDtypeStruct`s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfusion.bench.schedule import Schedule, plot_schedule, read_schedule
from sharding.compiler_options import overlap_options

DEVICES = 8
M, N = 1024, 1024  # each device's bf16 slab in the accelerator programs
RING = [(i, (i + 1) % DEVICES) for i in range(DEVICES)]
STEPS = 5


def shard_mapped(mesh: Mesh, per_device, inputs: int):
    """`per_device` over the mesh's "patch" axis: the first input split along it, the others
    replicated, the output split."""
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P("patch"), *[P()] * (inputs - 1)),
        out_specs=P("patch"),
        check_vma=False,
    )


def abstract(mesh: Mesh, shape, spec, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def gather_beside_matmuls(x, w):
    """An all-gather whose result is needed only at the end, beside an independent chain of
    matmuls: room for the scheduler to overlap them; a ppermute and a psum too."""
    gathered = jax.lax.all_gather(x, "patch")
    y = x
    for _ in range(4):
        y = jnp.tanh(y @ w)
    shifted = jax.lax.ppermute(x, "patch", RING)
    summed = jax.lax.psum(y, "patch")
    return y + gathered.sum(0) + shifted + summed


def scanned_step(x, w):
    """A denoising-loop stand-in: STEPS iterations of one matmul, an all-gather, a ppermute."""

    def step(carry, _):
        gathered = jax.lax.all_gather(carry, "patch")
        shifted = jax.lax.ppermute(carry, "patch", RING)
        return jnp.tanh(carry @ w) + gathered.sum(0) + shifted, None

    return jax.lax.scan(step, x, None, length=STEPS)[0]


LAYERS = 6


def displaced_layers(x, stale, w):
    """A displaced step's stand-in, in a scan: LAYERS layers, layer l reading the all-gather
    of `stale[l]` (what the step before kept: known when the step starts) and keeping its
    own output for the next step."""

    def step(carry, _):
        x, stale = carry
        kept = []
        for kept_before in stale:
            keys = jax.lax.all_gather(kept_before, "patch", tiled=True)  # (DEVICES * M, N)
            x = jnp.tanh(jax.nn.softmax((x @ w) @ keys.T, axis=-1) @ keys)
            kept.append(x)
        return (x, tuple(kept)), None

    return jax.lax.scan(step, (x, stale), None, length=STEPS)[0][0]


def layer_windows(mesh: Mesh, **compiler_options) -> list[float]:
    """The share of the step's FLOPs in flight beside each layer's all-gather, in order."""
    slab = abstract(mesh, (DEVICES * M, N), P("patch"))
    stale = (slab,) * LAYERS
    program = jax.shard_map(
        displaced_layers,
        mesh=mesh,
        in_specs=(P("patch"), P("patch"), P()),
        out_specs=P("patch"),
        check_vma=False,
    )
    lowered = jax.jit(program).lower(slab, stale, abstract(mesh, (N, N), P()))
    schedule = read_schedule(lowered.compile(compiler_options=compiler_options or None).as_text())
    (loop,) = schedule.entry_loops()
    gathers = [c for c in schedule.collectives_in(loop.body) if c.kind == "all-gather"]
    assert len(gathers) == LAYERS
    return [
        c.window_flops / schedule.flops(loop.body) for c in sorted(gathers, key=lambda c: c.done)
    ]


def check_overlap_options(mesh: Mesh, platform: str) -> None:
    """By default the compiler keeps one all-gather in flight: each travels beside about one
    layer (1 / LAYERS of the step); under `overlap_options` every one starts with the step,
    so layer l's travels beside the l layers before it (l / LAYERS), the last one's beside
    nearly the whole step."""
    one_at_a_time = layer_windows(mesh)
    assert max(one_at_a_time) <= 1.5 / LAYERS, one_at_a_time
    options = overlap_options(platform)
    windows = layer_windows(mesh, **options)
    expected = [layer / LAYERS for layer in range(LAYERS)]
    assert windows == pytest.approx(expected, abs=0.5 / LAYERS), windows


def compile_on(mesh: Mesh, per_device, shapes, **compiler_options) -> jax.stages.Compiled:
    """`per_device` shard-mapped over the mesh, compiled for abstract bf16 inputs of `shapes`
    (the first split along "patch", the others replicated)."""
    specs = [P("patch"), *[P()] * (len(shapes) - 1)]
    args = [abstract(mesh, shape, spec) for shape, spec in zip(shapes, specs, strict=True)]
    lowered = jax.jit(shard_mapped(mesh, per_device, len(shapes))).lower(*args)
    return lowered.compile(compiler_options=compiler_options or None)


def only(schedule: Schedule, computation: str, kind: str):
    found = [c for c in schedule.collectives_in(computation) if c.kind == kind]
    assert len(found) == 1, (kind, schedule.collectives_in(computation))
    return found[0]


# TPU v5e, 8 chips --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpu_mesh() -> Mesh:
    pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler")
    from jaxfusion.bench.targets import mesh, target

    return mesh(target("v5e-8"), (DEVICES,), ("patch",))


@pytest.fixture(scope="module")
def tpu_overlap(tpu_mesh):
    compiled = compile_on(tpu_mesh, gather_beside_matmuls, [(DEVICES * M, N), (N, N)])
    return read_schedule(compiled.as_text())


@pytest.fixture(scope="module")
def tpu_scan(tpu_mesh):
    return read_schedule(compile_on(tpu_mesh, scanned_step, [(DEVICES * M, N), (N, N)]).as_text())


def test_tpu_flops_match_cost_analysis(tpu_mesh):
    """A convolution and two matmuls: the reader's FLOPs of the entry computation against the
    TPU compiler's own count (which adds the few elementwise FLOPs, and weighs the padding
    the TPU adds to the convolution's output a little differently)."""

    def per_device(x, kernel, w):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        z = y.reshape(-1, 128) @ w
        return (z @ w).reshape(x.shape)

    compiled = compile_on(
        tpu_mesh, per_device, [(DEVICES, 64, 64, 128), (3, 3, 128, 128), (128, 128)]
    )
    reported = compiled.cost_analysis()["flops"]
    assert read_schedule(compiled.as_text()).flops() == pytest.approx(reported, rel=0.03)


def test_tpu_batched_matmul_flops(tpu_mesh):
    """Attention's scores, a matmul batched over batch and heads: XLA:TPU writes it as a
    convolution with each batch dimension a dilated window (one tap of it is real). The oracles:
    2 b h q k d, and the compiler's own count."""
    b, h, q, k, d = 2, 10, 512, 2048, 64

    def scores(queries, keys):
        return jnp.einsum("bhqd,bhkd->bhqk", queries, keys)

    compiled = compile_on(tpu_mesh, scores, [(DEVICES * b, h, q, d), (b, h, k, d)])
    flops = read_schedule(compiled.as_text()).flops()
    assert flops == 2 * b * h * q * k * d
    assert flops == pytest.approx(compiled.cost_analysis()["flops"], rel=0.01)


def test_tpu_collectives_bytes_and_overlap(tpu_overlap):
    schedule = tpu_overlap
    entry = schedule.entry
    gather = only(schedule, entry, "all-gather")
    assert gather.received_bytes == (DEVICES - 1) * M * N * 2
    assert gather.group_size == DEVICES
    permute = only(schedule, entry, "collective-permute")
    assert permute.received_bytes == M * N * 2
    reduce = only(schedule, entry, "all-reduce")
    assert reduce.received_bytes == 2 * (DEVICES - 1) * M * N * 2 // DEVICES
    matmul = 2 * M * N * N
    assert schedule.flops() == 4 * matmul
    hidden = [c for c in schedule.collectives if c.asynchronous and c.window_flops >= matmul]
    assert hidden, schedule.collectives
    assert all(c.window_flops <= schedule.flops() for c in schedule.collectives)


def gather_across_inner_loop(x, w):
    """An all-gather read after an inner loop of 4 matmuls (as an attention kernel's loop over
    key chunks): libtpu carries the collective's buffers through the loop."""
    gathered = jax.lax.all_gather(x, "patch", tiled=True)
    y = jax.lax.fori_loop(0, 4, lambda _, y: jnp.tanh(y @ w), x)
    return y + gathered[:M]


def test_tpu_collective_carried_through_a_loop(tpu_mesh):
    """The inner loop's 4 matmuls run while the all-gather travels; its body holds only the
    collective's continuation, not a collective of its own."""
    shapes = [(DEVICES * M, N), (N, N)]
    compiled = compile_on(tpu_mesh, gather_across_inner_loop, shapes, **overlap_options("tpu"))
    schedule = read_schedule(compiled.as_text())
    (loop,) = schedule.entry_loops()
    assert not schedule.collectives_in(loop.body)
    gather = only(schedule, schedule.entry, "all-gather")
    assert gather.start < loop.position < gather.done
    assert gather.window_flops == 4 * 2 * M * N * N == schedule.flops()


def test_tpu_overlap_options(tpu_mesh):
    check_overlap_options(tpu_mesh, "tpu")


def test_tpu_scan_body(tpu_scan):
    schedule = tpu_scan
    (loop,) = schedule.entry_loops()
    assert loop.trip_count == STEPS
    assert schedule.enclosing_loops[loop.body] == loop.name
    assert schedule.enclosing_loops[schedule.entry] is None
    assert only(schedule, loop.body, "all-gather").received_bytes == (DEVICES - 1) * M * N * 2
    assert only(schedule, loop.body, "collective-permute").received_bytes == M * N * 2
    assert not schedule.collectives_in(schedule.entry)
    assert schedule.flops(loop.body) == 2 * M * N * N
    assert schedule.flops() == STEPS * 2 * M * N * N


def test_plot_tpu_schedule(tpu_overlap, tmp_path):
    schedule = tpu_overlap
    path = tmp_path / "schedule.png"
    plot_schedule(schedule, schedule.entry, path, "all-gather beside 4 matmuls, v5e-8")
    assert path.read_bytes().startswith(b"\x89PNG")


# NVIDIA H100, 8 GPUs -----------------------------------------------------------------------

LATENCY_HIDING = {"xla_gpu_enable_latency_hiding_scheduler": True}


@pytest.fixture(scope="module")
def gpu_mesh() -> Mesh:
    pytest.importorskip(
        "jax_plugins.xla_cuda12", reason="JAX's CUDA plugin is not installed: no GPU compiler"
    )
    from jaxfusion.bench.targets import mesh, target

    return mesh(target("h100-8"), (DEVICES,), ("patch",))


def test_gpu_combined_all_gather(gpu_mesh):
    """Two all-gathers that XLA:GPU combines into one tuple-shaped all-gather-start."""

    def per_device(x, w):
        whole = jax.lax.all_gather(x, "patch")
        quarter = jax.lax.all_gather(x[:, : N // 4] * 2, "patch")
        y = x
        for _ in range(3):
            y = jnp.tanh(y @ w)
        return y + whole.sum(0) + quarter.sum(0).sum(1, keepdims=True)

    compiled = compile_on(gpu_mesh, per_device, [(DEVICES * M, N), (N, N)], **LATENCY_HIDING)
    schedule = read_schedule(compiled.as_text())
    gather = only(schedule, schedule.entry, "all-gather")
    assert len(gather.arrays) == 2
    assert gather.received_bytes == (DEVICES - 1) * (M * N + M * N // 4) * 2
    assert gather.asynchronous
    assert gather.window_flops == schedule.flops() == 3 * 2 * M * N * N


def test_gpu_overlap_options(gpu_mesh):
    check_overlap_options(gpu_mesh, "gpu")


def test_gpu_scan_trip_count(gpu_mesh):
    compiled = compile_on(gpu_mesh, scanned_step, [(DEVICES * M, N), (N, N)], **LATENCY_HIDING)
    schedule = read_schedule(compiled.as_text())
    (loop,) = schedule.entry_loops()
    assert loop.trip_count == STEPS
    assert only(schedule, loop.body, "all-gather").received_bytes == (DEVICES - 1) * M * N * 2
    assert schedule.flops() == STEPS * 2 * M * N * N


def test_gpu_cublas_and_cudnn_flops(gpu_mesh):
    """cuBLAS gemm custom calls (Triton gemms turned off) and a cuDNN convolution."""

    def per_device(x, kernel, w):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return (y.reshape(-1, 128) @ w).reshape(x.shape)

    compiled = compile_on(
        gpu_mesh,
        per_device,
        [(DEVICES, 32, 32, 128), (3, 3, 128, 128), (128, 128)],
        xla_gpu_enable_triton_gemm=False,
    )
    text = compiled.as_text()
    assert "__cublas$" in text and "__cudnn$conv" in text
    schedule = read_schedule(text)
    pixels = 32 * 32
    assert schedule.flops() == 2 * pixels * 128 * 9 * 128 + 2 * pixels * 128 * 128


# CPU, 8 simulated devices ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_collectives():
    mesh = Mesh(np.array(jax.devices("cpu")[:DEVICES]), ("patch",))

    def per_device(x, w):
        gathered = jax.lax.all_gather(x, "patch")
        y = jnp.tanh(x @ w)
        shifted = jax.lax.ppermute(x, "patch", RING)
        return y + gathered.sum(0) + shifted + jax.lax.psum(y, "patch")

    args = [abstract(mesh, (DEVICES * 64, 32), P("patch"), jnp.float32)]
    args.append(abstract(mesh, (32, 32), P(), jnp.float32))
    compiled = jax.jit(shard_mapped(mesh, per_device, 2)).lower(*args).compile()
    return read_schedule(compiled.as_text())


def test_cpu_collectives_are_synchronous(cpu_collectives):
    schedule = cpu_collectives
    slab = 64 * 32 * 4
    expected = {
        "all-gather": (DEVICES - 1) * slab,
        "collective-permute": slab,
        "all-reduce": 2 * (DEVICES - 1) * slab // DEVICES,
    }
    found = {c.kind: c for c in schedule.collectives_in(schedule.entry)}
    assert {kind: c.received_bytes for kind, c in found.items()} == expected
    assert all(c.start == c.done and c.window_flops == 0 for c in found.values())
    assert schedule.flops() == 2 * 64 * 32 * 32


def test_cpu_grouped_convolution_flops():
    """A convolution with 4 feature groups and a matmul, against the CPU compiler's count
    (without padding, where the two ways of counting agree)."""

    def f(x, kernel, w):
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4,
        )
        return y.reshape(-1, 16) @ w

    shapes = [(2, 10, 10, 16), (3, 3, 4, 16), (16, 8)]
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    compiled = jax.jit(f).lower(*args).compile()
    expected = 2 * (2 * 8 * 8 * 16) * 9 * 4 + 2 * 128 * 16 * 8
    assert compiled.cost_analysis()["flops"] == expected
    assert read_schedule(compiled.as_text()).flops() == expected


def test_plot_cpu_schedule(cpu_collectives, tmp_path):
    path = tmp_path / "schedule.png"
    plot_schedule(cpu_collectives, cpu_collectives.entry, path, "synchronous collectives, CPU")
    assert path.read_bytes().startswith(b"\x89PNG")


# Hand-written text: forms the compilers above do not print here -----------------------------

WRAPPED_ALL_TO_ALL = """\
HloModule wrapped, is_scheduled=true, num_partitions=8

%wrapped_all_to_all (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %all-to-all = f32[8,4]{1,0} all-to-all(%p), replica_groups=[2,4]<=[8], dimensions={0}
}

ENTRY %main (x: f32[8,4], w: f32[4,4]) -> f32[8,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = f32[4,4]{1,0} parameter(1)
  %start = ((f32[8,4]{1,0}), f32[8,4]{1,0}) async-start(%x), calls=%wrapped_all_to_all
  %dot = f32[8,4]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %update = ((f32[8,4]{1,0}), f32[8,4]{1,0}) async-update(%start)
  %done = f32[8,4]{1,0} async-done(%update)
  ROOT %sum = f32[8,4]{1,0} add(%done, %dot)
}
"""


def test_async_wrapped_collective_with_iota_groups():
    """`async-start` / `async-update` / `async-done` around an all-to-all, in groups of 4
    written as an iota list (`[2,4]<=[8]`: 2 groups of 4)."""
    schedule = read_schedule(WRAPPED_ALL_TO_ALL)
    (collective,) = schedule.collectives
    assert collective.kind == "all-to-all"
    assert collective.instructions == ("start", "update", "done")
    assert (collective.start, collective.done) == (2, 5)
    assert collective.group_size == 4
    assert collective.received_bytes == 8 * 4 * 4 * 3 // 4
    assert collective.window_flops == 2 * 8 * 4 * 4


KINDS_AND_GROUPS = """\
HloModule kinds_and_groups, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused (a: f32[2,1,32,4]) -> f32[2,1,32,4] {
  %a = f32[2,1,32,4]{3,2,1,0} parameter(0)
  ROOT %negate = f32[2,1,32,4]{3,2,1,0} negate(%a)
}

ENTRY %main (p.1: f32[2,1,32,4], p: bf16[1,16,8], q: f32[2,8], r: f32[10], s: f32[6]) -> f32[2,1,32,4] {
  %p.1 = f32[2,1,32,4]{3,2,1,0} parameter(0)
  %p = bf16[1,16,8]{2,1,0} parameter(1)
  %q = f32[2,8]{1,0} parameter(2)
  %r = f32[10]{0} parameter(3)
  %s = f32[6]{0} parameter(4)
  %cp.3 = f32[2,1,32,4]{3,2,1,0} collective-permute(%p.1), source_target_pairs={{0,1},{1,2}}
  %ag.1 = bf16[4,16,8]{2,1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%q), replica_groups=[2,4]<=[8], dimensions={0}
  %all-reduce.2 = f32[10]{0} all-reduce(%r), replica_groups={{0,1}}, to_apply=%add
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %combined = (f32[10]{0}, f32[6]{0}) all-reduce(%r, %s), replica_groups={{0,1}}, to_apply=%add
  ROOT %fusion.1 = f32[2,1,32,4]{3,2,1,0} fusion(%cp.3), kind=kLoop, calls=%fused
}
"""  # noqa: E501


def test_collective_kinds_and_groups():
    """Groups listed (`{{0,1,2,3}}`), as an iota list (`[2,4]<=[8]`: 2 groups of 4) and as a
    collective-permute's source-target pairs (3 devices); an all-gather-start's tuple (operand,
    result), its done giving the result; a combined (tuple-shaped) all-reduce, its arrays'
    bytes summed; a fusion reading a collective's result is none. The bytes worked out by hand
    from the shapes."""
    schedule = read_schedule(KINDS_AND_GROUPS)
    found = [(c.kind, c.instructions, c.group_size, c.received_bytes) for c in schedule.collectives]
    assert found == [
        ("collective-permute", ("cp.3",), 3, 2 * 32 * 4 * 4),  # all of f32[2,1,32,4]
        ("all-gather", ("ag.1",), 4, 3 * 16 * 8 * 2),  # 3 parts of 4 of bf16[4,16,8]
        ("all-gather", ("ags", "agd"), 4, 3 * 2 * 8 * 4),  # 3 parts of 4 of f32[8,8]
        ("all-reduce", ("all-reduce.2",), 2, 10 * 4),  # 2 x 1/2 of f32[10]
        ("all-reduce", ("combined",), 2, (10 + 6) * 4),  # 2 x 1/2 of f32[10] and f32[6]
    ]


def test_unscheduled_text_is_refused():
    with pytest.raises(ValueError, match="scheduled"):
        read_schedule("HloModule lowered, entry_computation_layout={()->f32[]}\n")
