"""One tiny random SDXL-shaped UNet in both frameworks and its denoising loop: jaxfusion's
under any `ParallelConfig`, and the sequential PyTorch reference's
(`distrifusion_reference.py`) under any DistriFusion rule (tests/test_parallel.py,
tests/test_codecs.py)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers_models import SD_NOISE_SCHEDULE, SDXL_LIGHT, randomize
from distrifusion_reference import reference_denoise
from fake_sampling import diffusers_scheduler
from flax import nnx

from jaxfusion import schedulers
from jaxfusion.models import Conditioning, load_unet
from sharding import ParallelConfig
from sharding.loops import Sampling, denoise

STEPS, WARMUP, GUIDANCE = 4, 1, 5.0
LATENT = 32  # 3 UNet levels: with P = 8 the smallest feature map is one row per patch
ROUNDING = 1e-5  # float32, relative L2: what reordering the same sums may change
# A codec's rounding of float32 activations may fall on the other side of a decision boundary
# than the reference's float64 in a few of the UNet's values; one such value moves the run
# by about one quantization step of its row, far below what the codec itself changes.
CODEC_ROUNDING = 1e-4
SCHEDULER = dict(SD_NOISE_SCHEDULE, timestep_spacing="leading")
# The sampler kinds run (the reference runs the diffusers scheduler of each): dpmpp is
# stateful (the previous model output).
KINDS = ("euler", "dpmpp")


class Case:
    """A tiny random SDXL-shaped UNet (SDXL_LIGHT) in both frameworks (same weights), an Euler
    schedule, and one CFG batch of inputs; JAX runs are compiled once per parallel
    configuration and scheduler (Euler, or DPM-Solver++ whose state also lives on the
    slabs)."""

    def __init__(self, folder, latent_size: tuple[int, int] = (LATENT, LATENT)):
        torch.manual_seed(0)
        self.torch_unet = randomize(diffusers.UNet2DConditionModel(**SDXL_LIGHT))
        self.torch_unet.save_pretrained(folder)
        self.unet = load_unet(folder)
        rng = np.random.default_rng(0)
        self.latents = rng.standard_normal((1, 4, *latent_size)).astype(np.float32)
        pooled = SDXL_LIGHT["projection_class_embeddings_input_dim"] - 6 * 8
        self.conditioning = Conditioning(
            rng.standard_normal((2, 7, SDXL_LIGHT["cross_attention_dim"])).astype(np.float32),
            rng.standard_normal((2, pooled)).astype(np.float32),
            np.tile(np.float32([128, 128, 0, 0, 128, 128]), (2, 1)),
        )
        self.schedules = {
            kind: schedulers.make_schedule(
                schedulers.SchedulerConfig.from_diffusers(SCHEDULER, kind), STEPS
            )
            for kind in KINDS
        }
        self.schedule = self.schedules["euler"]
        self._runs = {}

    def jax(self, parallel: ParallelConfig, scheduler: str = "euler") -> np.ndarray:
        """Final latents (B, C, h, w) of the JAX loop."""
        key = parallel, scheduler
        if key not in self._runs:
            schedule = self.schedules[scheduler]
            graphdef, weights = nnx.split(self.unet)
            sampling = Sampling(schedule, self.conditioning, jnp.float32(GUIDANCE))
            latents = jnp.asarray(self.latents.transpose(0, 2, 3, 1)) * schedule.init_noise_sigma
            run = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
            self._runs[key] = np.asarray(run(weights, sampling, latents)).transpose(0, 3, 1, 2)
        return self._runs[key]

    def reference(
        self,
        mode: str,
        patches: int = 1,
        gn: str = "corrected",
        warmup: int = WARMUP,
        scheduler: str = "euler",
        split: str = "row",
        compress: str = "none",
        kv_refresh: int = 1,
        slab_rows: tuple[int, ...] | None = None,
        slab_columns: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Final latents of the sequential PyTorch reference (diffusers' scheduler); the
        slabs' sizes where they are unequal (`reference_denoise`)."""
        ehs, text_embeds, time_ids = (torch.from_numpy(x) for x in self.conditioning)
        out = reference_denoise(
            self.torch_unet,
            diffusers_scheduler(scheduler)(**SCHEDULER),
            torch.from_numpy(self.latents),
            ehs,
            added_cond_kwargs=dict(text_embeds=text_embeds, time_ids=time_ids),
            guidance_scale=GUIDANCE,
            num_inference_steps=STEPS,
            patches=patches,
            warmup_steps=warmup,
            gn=gn,
            mode=mode,
            split=split,
            compress=compress,
            kv_refresh=kv_refresh,
            slab_rows=slab_rows,
            slab_columns=slab_columns,
        )
        return out.numpy()


SINGLE = ParallelConfig()
