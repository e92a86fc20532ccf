"""`ParallelConfig`: how one image is spread over devices, and the device mesh it runs on."""

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from sharding.compiler_options import overlap_options
from sharding.context import AXIS
from sharding.names import (
    COMPRESSIONS,
    GROUP_NORM_RULES,
    MODES,
    NAIVE_SPLITS,
    Compression,
    GroupNormRule,
    Mode,
    NaiveSplit,
)
from sharding.split import most_patches

CFG_AXIS = "cfg"
DATA_AXIS = "data"
MESH_AXES = (DATA_AXIS, CFG_AXIS, AXIS)
# The longest default warm-up: DistriFusion's 4 synchronous steps after step 0 (of 50).
DEFAULT_WARMUP_STEPS = 4
StepKind = Literal["single", "sync", "naive", "warm-up", "displaced"]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the denoising loop of one image runs over `devices` devices.

    devices: N = D x C x P devices of `jax.devices()` (the first ones, ordered by process
        then id: with several processes, `sharding.distributed`), on a mesh with axes
        ("data", "cfg", "patch") of sizes (D, C, P); the patch axis is innermost, so
        neighbouring patches sit on the same process (host) where they can.
    data: D, the groups of devices that a batch of B prompts (B a multiple of D) is split
        over, B / D prompts each; every group runs the loop over its own (cfg, patch)
        submesh.
    cfg: C = 1, or 2 to put the unconditional and conditional halves of classifier-free
        guidance on different devices (they exchange their noise predictions each step).
    mode: "single" (one device, the plain loop), "sync" (patch parallel with exact,
        synchronous exchanges), "displaced" (DistriFusion: context from the previous step
        after `warmup_steps` + 1 synchronous steps), "naive" (each device runs its slab
        alone, no exchange). Default: "displaced" with several devices, else "single".
    warmup_steps: displaced mode runs steps 0..warmup_steps synchronously; None: as
        `default_warmup_steps` says for the run's step count.
    group_norm: the GroupNorm rule of displaced steps: "corrected", "stale", "separate",
        "sync" (see `sharding.group_norm.image_moments`).
    naive_split: naive mode's slabs: "row", "col", or "alternate" (rows on even steps,
        columns on odd steps, as the reference implementation; switching needs one
        all-to-all of the latent each way on odd steps).
    compress: the codec of what displaced steps exchange and keep (self-attention K/V and
        conv halos; GroupNorm moments stay exact): "none", "fp8", "int8", "residual-int4",
        "residual-int2", "residual-1bit" (see `sharding.codecs`). Displaced mode only.
    kv_refresh: K, displaced steps exchange self-attention K/V only every K-th step
        (`refreshes_kv`); the stale K/V age by up to K steps. Displaced mode only.
    device_pool: the devices the mesh is made of (its first D x C x P, in order); None:
        this process's `jax.devices()`. The devices of an accelerator topology compile the
        program for hardware that is not here (`jaxfusion.bench.targets`).
    """

    devices: int = 1
    cfg: int = 1
    data: int = 1
    mode: Mode | None = None
    warmup_steps: int | None = None
    group_norm: GroupNormRule = "corrected"
    naive_split: NaiveSplit = "row"
    compress: Compression = "none"
    kv_refresh: int = 1
    device_pool: tuple[jax.Device, ...] | None = None

    def __post_init__(self):
        if self.mode is None:
            object.__setattr__(self, "mode", "displaced" if self.devices > 1 else "single")
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r} is not one of {list(MODES)}")
        if self.group_norm not in GROUP_NORM_RULES:
            problems.append(
                f"group_norm={self.group_norm!r} is not one of {list(GROUP_NORM_RULES)}"
            )
        if self.naive_split not in NAIVE_SPLITS:
            problems.append(f"naive_split={self.naive_split!r} is not one of {list(NAIVE_SPLITS)}")
        if self.compress not in COMPRESSIONS:
            problems.append(f"compress={self.compress!r} is not one of {list(COMPRESSIONS)}")
        elif self.compress != "none" and self.mode != "displaced":
            problems.append(
                f"compress={self.compress!r} compresses displaced steps: use mode='displaced' "
                f"(mode {self.mode!r} exchanges exact values or none)"
            )
        if self.kv_refresh < 1:
            problems.append(f"kv_refresh={self.kv_refresh}: use 1 (every step) or more")
        elif self.kv_refresh > 1 and self.mode != "displaced":
            problems.append(f"kv_refresh={self.kv_refresh} needs mode='displaced'")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.cfg not in (1, 2):
            problems.append(f"cfg={self.cfg}: use 1, or 2 to split the guidance halves")
        elif self.data < 1:
            problems.append(f"data={self.data}: use 1 or more")
        elif self.devices < 1:
            problems.append(f"devices={self.devices}: use 1 or more")
        elif self.devices % (self.data * self.cfg):
            groups = f"{self.data} (data) x " if self.data > 1 else ""
            problems.append(
                f"{self.devices} devices do not factor into {groups}{self.cfg} (CFG) x P "
                f"(patches): use a multiple of {self.data * self.cfg} devices"
            )
        if self.mode == "single" and (self.cfg != 1 or self.data != 1):
            problems.append("mode='single' runs on one device: cfg and data must be 1")
        if problems:
            raise ValueError("invalid parallel configuration: " + "; ".join(problems))

    @property
    def patches(self) -> int:
        """P, the patch devices along height (along width for naive column slabs)."""
        return 1 if self.mode == "single" else self.devices // (self.data * self.cfg)

    def check_batch(self, batch: int) -> None:
        """Refuses a batch of prompts that does not split into D equal groups."""
        if batch % self.data:
            lower = max(self.data, batch // self.data * self.data)
            raise ValueError(
                f"{batch} prompt(s) do not split over data={self.data} device groups: give a "
                f"multiple of {self.data} prompts (e.g. {lower} or {lower + self.data}), or a "
                f"smaller data that divides {batch} (--data-parallel D on the command line)"
            )

    def schedule(self, steps: int) -> list[tuple[StepKind, range]]:
        """The denoising loop of `steps` steps as its scans, in program order: (the kind of
        their steps, their step indices); scans without steps are left out.

        Displaced mode: steps 0..`warmup(steps)` "warm-up" (synchronous, and they keep what
        they receive as stale buffers), then the rest "displaced". The other modes: one scan
        of steps of their own kind ("single", "sync" or "naive").
        """
        if self.mode != "displaced":
            scans = [(self.mode, range(steps))]
        else:
            warm = min(self.warmup(steps) + 1, steps)
            scans = [("warm-up", range(warm)), ("displaced", range(warm, steps))]
        return [(kind, indices) for kind, indices in scans if len(indices)]

    def warmup(self, steps: int) -> int:
        """W of a run of `steps` steps (displaced mode runs steps 0..W synchronously):
        `warmup_steps`, or `default_warmup_steps(steps)` where that is None."""
        return default_warmup_steps(steps) if self.warmup_steps is None else self.warmup_steps

    def for_steps(self, steps: int) -> "ParallelConfig":
        """This configuration with the warm-up of a run of `steps` steps filled in."""
        return dataclasses.replace(self, warmup_steps=self.warmup(steps))

    def refreshes_kv(self, step, steps: int):
        """Whether displaced step `step` (an int or a traced int32) of a run of `steps`
        steps exchanges self-attention K/V: every `kv_refresh`-th after the warm-up's last
        (step W), so steps W+1..W+K read step W's, steps W+K+1..W+2K step W+K's, ..."""
        return (step - self.warmup(steps)) % self.kv_refresh == 0

    def has_displaced_steps(self, steps: int) -> bool:
        """Whether a run of `steps` steps has any displaced step (the warm-up may cover all)."""
        return any(kind == "displaced" for kind, _ in self.schedule(steps))

    def mesh(self, abstract: bool = False) -> Mesh | AbstractMesh:
        """The (data, cfg, patch) mesh over the first D x C x P of `jax.devices()` in
        `mesh_order` (by process, then id), laid out by `device_grid` (the patch axis
        innermost); one device: this process's first, so that every process of a
        multi-process run computes it. With `abstract`, its shape only, to trace programs
        without the devices."""
        needed = self.data * self.cfg * self.patches
        if abstract:
            return AbstractMesh((self.data, self.cfg, self.patches), MESH_AXES)
        if self.device_pool is not None:
            available = list(self.device_pool)
        elif needed == 1:  # exchanges nothing: with several processes, each runs it alone
            available = jax.local_devices()
        else:
            available = mesh_order(jax.devices())
        if len(available) < needed:
            raise ValueError(
                f"{needed} devices asked, {len(available)} available ({available[0].platform}); "
                "on CPU, simulate more with jax.config.update('jax_num_cpu_devices', N) before "
                "JAX starts (the jaxfusion command does this for --devices N)"
            )
        return Mesh(self.device_grid(available), MESH_AXES)

    def device_grid(self, available: Sequence[Any]) -> np.ndarray:
        """The (D, C, P) array of the mesh's devices: the first D x C x P of `available`, in
        their order, the patch axis innermost and the data axis outermost, so that the P
        patches of a guidance half are neighbours in `available` (on one host, when it is
        in `mesh_order` and the host holds P devices or more)."""
        shape = (self.data, self.cfg, self.patches)
        grid = np.empty(math.prod(shape), dtype=object)
        grid[:] = list(available[: grid.size])
        return grid.reshape(shape)

    def compiler_options(self) -> dict[str, Any]:
        """The XLA options of a program on this mesh (`sharding.compiler_options`): those
        that let a displaced step's exchange overlap its compute, on several devices."""
        if self.devices == 1:
            return {}
        return overlap_options(self.mesh().devices.flat[0].platform)

    def check_size(
        self, height: int, width: int, factor: int, unit: int, multiple: int | None = None
    ) -> None:
        """Refuses an image whose split side has too few latent rows for P patches: each
        needs a real row at the denoiser's coarsest level, and the slabs' boundaries sit at
        multiples of `unit` latent rows (`sharding.split`; `factor` pixels per latent row).
        The message names the device counts that work and the least size (a multiple of
        `multiple` pixels, default `factor`) that these patches take."""
        if self.mode == "single" or self.patches == 1:
            return
        sides = {"row": ("height",), "col": ("width",), "alternate": ("height", "width")}
        split = sides[self.naive_split] if self.mode == "naive" else ("height",)
        for name, size in (("height", height), ("width", width)):
            most = most_patches(size // factor, unit)
            if name in split and self.patches > most:
                groups = self.devices // self.patches
                step = factor if multiple is None else multiple
                least = -(-((self.patches - 1) * unit + 1) * factor // step) * step
                lines = "rows" if name == "height" else "columns"
                raise ValueError(
                    f"{name}={size} does not split into {self.patches} patches: each patch "
                    f"needs at least one of the {-(-size // (unit * factor))} {lines} of "
                    f"{unit * factor} pixels that the model's coarsest level has; use at most "
                    f"{most} patches ({groups} to {most * groups} devices"
                    + (" with CFG parallel" if self.cfg > 1 else "")
                    + f"), or a {name} of at least {least}"
                )


def mesh_order(devices: Iterable[Any]) -> list[Any]:
    """`devices` in the order `ParallelConfig.mesh` takes `jax.devices()` in: by process
    (`process_index`), then `id`. A process's devices are neighbours, so the patch axis,
    innermost (`ParallelConfig.device_grid`), keeps neighbouring patches on one host where
    it can."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def default_warmup_steps(steps: int) -> int:
    """The warm-up W of displaced mode unless one is chosen: min(4, max(1, steps // 4)).

    DistriFusion's 4 for long runs (16 steps and more: 50-step runs keep the paper's
    setting); about a quarter of the steps for short ones, so that a few-step run still
    has displaced steps (4 steps: 2 synchronous, 2 displaced), but never W = 0: displaced
    steps that start from step 0's activations, the noisiest and furthest from the next,
    lose PSNR against single that W = 1 keeps (docs/performance.md, "Few-step runs",
    measures each warm-up).
    """
    return min(DEFAULT_WARMUP_STEPS, max(1, steps // 4))
