"""The XLA options under which a displaced step's exchange travels while the step computes.

A displaced step's collectives send messages that exist before the layers that read them
(`sharding.context`), so the compiler may start each one long before its done. By default
neither compiler does in a program of independent layers: both keep one all-gather in
flight at a time and start it after the previous one's done, so each waits behind the one
before (tests/test_schedule.py), and XLA:GPU also combines the step's all-gathers into a
few, each done before its first reader (docs/performance.md, "The exchange on the real
compilers"). These options let all of them travel at once (`IN_FLIGHT`, more than a step
has), each started as early as its operands allow:

- TPU: `xla_max_concurrent_async_all_gathers`, and libtpu's async-collective merger off
  (the configuration docs/performance.md's TPU figures were compiled with; on the UNet
  loops tried, libtpu's schedule hides as much with the merger on);
- GPU: `xla_gpu_experimental_parallel_collective_overlap_limit` and
  `xla_gpu_experimental_collective_start_as_early_as_possible`, with the all-gather and
  collective-permute combiners off (a combined collective is done before its first reader).

Each collective in flight holds its result buffer from its start to its reader, which costs
memory (`bench analyze --target` reports it per chip). The bound is above any step's count
of collectives: under a smaller one the decoder's exchanges, started with the step, hold
every slot until their layers, and the down blocks' (`sends_when_produced`) wait for them,
to the end of the step.
"""

from typing import Any

IN_FLIGHT = 1024


def overlap_options(platform: str) -> dict[str, Any]:
    """The compiler options of a patch-parallel program on `platform` (a JAX device's
    `platform`: "tpu", "gpu" or "cuda", "cpu", ...); none where its collectives are
    synchronous anyway (CPU) or the compiler is not one of these."""
    if platform == "tpu":
        return {
            "xla_max_concurrent_async_all_gathers": IN_FLIGHT,
            "xla_tpu_enable_async_collective_merger": False,
        }
    if platform in ("gpu", "cuda"):
        return {
            "xla_gpu_experimental_parallel_collective_overlap_limit": IN_FLIGHT,
            "xla_gpu_experimental_collective_start_as_early_as_possible": True,
            "xla_gpu_all_gather_combine_threshold_bytes": 0,
            "xla_gpu_collective_permute_combine_threshold_bytes": 0,
        }
    return {}
