"""What one generation asks for: `Request`, built from a pipeline call's arguments and
checked once, before anything compiles. It knows no model: the pipeline checks what it
asks of one (the size, the scheduler, the devices) in `TextToImagePipeline.prepare`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from jaxfusion.models.names import AttentionBackend

if TYPE_CHECKING:
    import numpy as np

    from sharding.parallel import ParallelConfig

# What a call returns: decoded images, or the final latents (for a refiner to continue).
Output = Literal["images", "latents"]
OUTPUTS: tuple[Output, ...] = ("images", "latents")


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One generation, as a pipeline call asks for it: `pipe(prompt, height=1024, seed=0)`
    is `pipe(Request(prompt, height=1024, seed=0))`, and a call's keyword arguments that
    name no field are the model family's own options (`conditioning`).

    prompt: a prompt or a batch of B prompts.
    negative_prompt: one for all prompts, or B; None: "" (SD) or all-zero negative
      embeddings where the folder says `force_zeros_for_empty_prompt` (SDXL base).
    height, width: in pixels; default the model's native size, or the starting image's
      (which they must then equal).
    num_inference_steps: sampler steps of the whole schedule (a starting image or
      denoising_start/denoising_end run part of them).
    guidance_scale: classifier-free guidance; <= 1 turns it off (the denoiser then runs on
      the conditional batch alone, as diffusers). None: the model's default, as diffusers.
    seed: the noise `jax.random.normal(jax.random.key(seed), ...)`; euler_a and lcm also
      draw fresh noise at each step from it (`step_noises`), also with `latents`.
    latents: explicit noise instead, as diffusers draws it: (B, C, h, w) NCHW unit noise
      (Flux: FluxPipeline's packed (B, h/2 * w/2, 4C)); from noise, the initial latents
      before the scheduler's init_noise_sigma; from an image, the noise added to its
      latents.
    scheduler: "euler", "ddim", "dpmpp", "euler_a" (Euler ancestral) or "lcm" (latent
      consistency, for LCM-LoRA) on the folder's noise schedule, or "flow_match" (Flux's,
      its only one); None: the folder's own scheduler.
    parallel: how the denoising loop and the VAE encode and decode run over devices
      (default: one device). The latent stays split by rows from the encoded image or the
      first step to the decoded image; the weights are placed on the mesh once and reused
      by later calls.
    attention: the attention kernel; None: the pipeline's (`attention` at loading).
    image: image-to-image: the image to start from, (H, W, 3) or (B, H, W, 3) float in
      [0, 1] (or uint8), or PIL images; one for all prompts, or B. The VAE encodes it to
      the mean of its latent distribution (diffusers samples it: the difference is the
      encoder's small posterior noise), scaled by the VAE's scaling factor.
    image_latents: instead of `image`, the image in the denoiser's latent space, (B, C, h,
      w) NCHW, or batch 1: for a refiner, a base pipeline's `output="latents"`.
    strength: image-to-image, how much of the schedule runs (diffusers' `strength`): the
      last int(strength * num_inference_steps) steps, the image noised to the first of
      them. None: the model's `default_strength` (diffusers': SD 0.8, SDXL 0.3).
    denoising_start: image-to-image continuing a base pipeline's run (diffusers'
      `denoising_start`, the refiner's high noise fraction): the steps after that fraction
      of the schedule; the start is taken as noised already (no noise is added) and
      strength is ignored.
    denoising_end: stop after this fraction of the schedule (diffusers' `denoising_end`),
      e.g. with output="latents" for a refiner to continue.
    output: "images", or "latents": the final latents, (B, C, h, w) float32 NCHW in the
      denoiser's latent space (diffusers' `output_type="latent"`), not decoded.
    conditioning: the model family's own options, by name, checked by its pipeline (SD:
      clip_skip, diffusers' `clip_skip`; SDXL also original_size, crops_coords_top_left,
      target_size; the SDXL refiner aesthetic_score, negative_aesthetic_score).
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    seed: int = 0
    latents: np.ndarray | None = None
    scheduler: str | None = None
    parallel: ParallelConfig | None = None
    attention: AttentionBackend | None = None
    image: Any = None
    image_latents: np.ndarray | None = None
    strength: float | None = None
    denoising_start: float | None = None
    denoising_end: float | None = None
    output: Output = "images"
    conditioning: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Refuses what no model could run: a prompt that is not one, options that do not
        go together, a batch that does not split over `parallel`'s device groups."""
        batch = self.batch
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}: use one of {list(OUTPUTS)}")
        if self.image is not None and self.image_latents is not None:
            raise ValueError("pass image or image_latents, not both")
        if not self.from_image:
            for name in ("strength", "denoising_start"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for image-to-image: pass image= as well")
        if self.denoising_start is not None and self.latents is not None:
            raise ValueError(
                "with denoising_start the starting image is taken as noised already and no "
                "noise is added: leave out latents"
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps}: use 1 or more")
        negative = self.negative_prompt
        if not (negative is None or isinstance(negative, str)) and len(negative) != batch:
            raise ValueError(
                f"{len(negative)} negative prompts for {batch} prompts; give one or {batch}"
            )
        if self.parallel is not None:
            self.parallel.check_batch(batch)

    @classmethod
    def of(
        cls,
        prompt: str | Sequence[str] | Request,
        negative_prompt: str | Sequence[str] | None = None,
        **arguments: Any,
    ) -> Request:
        """The request of a pipeline call: `prompt` itself when it is one (and nothing else
        is given), else the fields `arguments` name, the others going to `conditioning`."""
        if isinstance(prompt, Request):
            if negative_prompt is not None or arguments:
                raise TypeError("pass a Request or its fields, not both")
            return prompt
        names = {field.name for field in dataclasses.fields(cls)} - {"conditioning"}
        fields = {name: value for name, value in arguments.items() if name in names}
        extras = {name: value for name, value in arguments.items() if name not in names}
        return cls(prompt, negative_prompt, **fields, conditioning=extras)

    @property
    def prompts(self) -> list[str]:
        """The B prompts; anything but a prompt or a non-empty sequence of them refused."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if (
            not isinstance(prompts, Sequence)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            message = f"prompt must be a string or a non-empty list of strings, got {self.prompt!r}"
            raise TypeError(message[:200])
        return list(prompts)

    @property
    def batch(self) -> int:
        """B, the number of prompts: one image each."""
        return len(self.prompts)

    @property
    def negative_prompts(self) -> list[str]:
        """B negative prompts: the one given for each prompt ("" for None), or each one's."""
        negative = self.negative_prompt
        if negative is None or isinstance(negative, str):
            return [negative or ""] * self.batch
        return list(negative)

    @property
    def from_image(self) -> bool:
        """Image-to-image: the request starts from an image (or its latents)."""
        return self.image is not None or self.image_latents is not None
