"""`ParallelConfig`: how one image is spread over devices, and the device mesh it runs on."""

import dataclasses
from typing import Literal

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from sharding.context import AXIS
from sharding.names import GROUP_NORM_RULES, MODES, NAIVE_SPLITS, GroupNormRule, Mode, NaiveSplit

CFG_AXIS = "cfg"
StepKind = Literal["single", "sync", "naive", "warm-up", "displaced"]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the denoising loop of one image runs over `devices` devices.

    devices: C x P devices of `jax.devices()` (the first ones), on a mesh with axes
        ("cfg", "patch") of sizes (C, P).
    cfg: C = 1, or 2 to put the unconditional and conditional halves of classifier-free
        guidance on different devices (they exchange their noise predictions each step).
    mode: "single" (one device, the plain loop), "sync" (patch parallel with exact,
        synchronous exchanges), "displaced" (DistriFusion: context from the previous step
        after `warmup_steps` + 1 synchronous steps), "naive" (each device runs its slab
        alone, no exchange). Default: "displaced" with several devices, else "single".
    warmup_steps: displaced mode runs steps 0..warmup_steps synchronously.
    group_norm: the GroupNorm rule of displaced steps: "corrected", "stale", "separate",
        "sync" (see `sharding.group_norm.image_moments`).
    naive_split: naive mode's slabs: "row", "col", or "alternate" (rows on even steps,
        columns on odd steps, as the reference implementation; switching needs one
        all-to-all of the latent each way on odd steps).
    """

    devices: int = 1
    cfg: int = 1
    mode: Mode | None = None
    warmup_steps: int = 4
    group_norm: GroupNormRule = "corrected"
    naive_split: NaiveSplit = "row"

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
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.cfg not in (1, 2):
            problems.append(f"cfg={self.cfg}: use 1, or 2 to split the guidance halves")
        elif self.devices < 1:
            problems.append(f"devices={self.devices}: use 1 or more")
        elif self.devices % self.cfg:
            problems.append(
                f"{self.devices} devices do not factor into 2 (CFG) x P (patches): use an even "
                "number of devices, or cfg=1"
            )
        if self.mode == "single" and self.cfg != 1:
            problems.append("mode='single' runs on one device: cfg must be 1")
        if problems:
            raise ValueError("invalid parallel configuration: " + "; ".join(problems))

    @property
    def patches(self) -> int:
        """P, the patch devices along height (along width for naive column slabs)."""
        return 1 if self.mode == "single" else self.devices // self.cfg

    def schedule(self, steps: int) -> list[tuple[StepKind, range]]:
        """The denoising loop of `steps` steps as its scans, in program order: (the kind of
        their steps, their step indices); scans without steps are left out.

        Displaced mode: steps 0..`warmup_steps` "warm-up" (synchronous, and they keep what
        they receive as stale buffers), then the rest "displaced". The other modes: one scan
        of steps of their own kind ("single", "sync" or "naive").
        """
        if self.mode != "displaced":
            scans = [(self.mode, range(steps))]
        else:
            warm = min(self.warmup_steps + 1, steps)
            scans = [("warm-up", range(warm)), ("displaced", range(warm, steps))]
        return [(kind, indices) for kind, indices in scans if len(indices)]

    def has_displaced_steps(self, steps: int) -> bool:
        """Whether a run of `steps` steps has any displaced step (the warm-up may cover all)."""
        return any(kind == "displaced" for kind, _ in self.schedule(steps))

    def mesh(self, abstract: bool = False) -> Mesh | AbstractMesh:
        """The (cfg, patch) mesh over the first C x P of `jax.devices()`; with `abstract`,
        its shape only, to trace programs without the devices."""
        needed = self.cfg * self.patches
        if abstract:
            return AbstractMesh((self.cfg, self.patches), (CFG_AXIS, AXIS))
        available = jax.devices()
        if len(available) < needed:
            raise ValueError(
                f"{needed} devices asked, {len(available)} available ({available[0].platform}); "
                "on CPU, simulate more with jax.config.update('jax_num_cpu_devices', N) before "
                "JAX starts (the jaxfusion command does this for --devices N)"
            )
        devices = np.array(available[:needed]).reshape(self.cfg, self.patches)
        return Mesh(devices, (CFG_AXIS, AXIS))

    def check_size(self, height: int, width: int, multiple: int) -> None:
        """Refuses an image whose feature maps do not split into P equal slabs at every UNet
        level. `multiple`: what one device needs the split side to be a multiple of (the
        VAE's downscale factor times 2 ** (UNet levels - 1)); with P patches, P times that."""
        if self.mode == "single" or self.patches == 1:
            return
        sides = {"row": ("height",), "col": ("width",), "alternate": ("height", "width")}
        split = sides[self.naive_split] if self.mode == "naive" else ("height",)
        step = multiple * self.patches
        for name, size in (("height", height), ("width", width)):
            if name in split and size % step:
                lower = max(step, size // step * step)
                raise ValueError(
                    f"{name}={size} does not split into {self.patches} patches at every UNet "
                    f"level: it must be a multiple of {step} ({multiple} per patch x "
                    f"{self.patches} patches); use {lower} or {lower + step}"
                )
