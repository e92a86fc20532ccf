"""Self-tests of the PyTorch DistriFusion reference (tests/distrifusion_reference.py), the oracle
of jaxfusion's displaced mode. Tiny random SDXL- and SD 1.x-shaped diffusers UNets."""

from __future__ import annotations

import itertools

import diffusers
import pytest
import torch
from diffusers_models import SD15_LIKE, SD_NOISE_SCHEDULE, SDXL_LIKE, randomize
from distrifusion_reference import (
    GN_RULES,
    NAIVE_SPLITS,
    DisplacedUNet,
    _hooked,
    _State,
    reference_denoise,
)

STEPS = 4


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


class _Case:
    """A UNet, its scheduler and the inputs of one denoising run (batch 1, 16 x 16 latent)."""

    def __init__(self, kind: str):
        generator = torch.Generator().manual_seed(1)
        torch.manual_seed(0)
        config = SDXL_LIKE if kind == "sdxl" else SD15_LIKE
        self.unet = randomize(diffusers.UNet2DConditionModel(**config))
        self.latents = torch.randn(1, 4, 16, 16, generator=generator)
        cross = config["cross_attention_dim"]
        if kind == "sdxl":  # classifier-free guidance, Euler
            self.guidance_scale = 5.0
            self.encoder_hidden_states = torch.randn(2, 7, cross, generator=generator)
            pooled = config["projection_class_embeddings_input_dim"] - 6 * 8
            self.added_cond_kwargs = dict(
                text_embeds=torch.randn(2, pooled, generator=generator),
                time_ids=torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2),
            )
            self.scheduler = lambda: diffusers.EulerDiscreteScheduler(
                **SD_NOISE_SCHEDULE, timestep_spacing="leading"
            )
        else:  # no guidance, DDIM
            self.guidance_scale = None
            self.encoder_hidden_states = torch.randn(1, 7, cross, generator=generator)
            self.added_cond_kwargs = None
            self.scheduler = lambda: diffusers.DDIMScheduler(
                **SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False
            )
        self._single = None

    def denoise(self, **kwargs) -> torch.Tensor:
        kwargs = dict(dict(patches=1, warmup_steps=1, num_inference_steps=STEPS), **kwargs)
        return reference_denoise(
            self.unet,
            self.scheduler(),
            self.latents,
            self.encoder_hidden_states,
            added_cond_kwargs=self.added_cond_kwargs,
            guidance_scale=self.guidance_scale,
            **kwargs,
        )

    @property
    def single(self) -> torch.Tensor:
        if self._single is None:
            self._single = self.denoise(mode="single")
        return self._single

    def unet_inputs(self, seed: int = 2):
        """A noisy UNet batch (the CFG batch for sdxl) and a timestep, for one-step checks."""
        generator = torch.Generator().manual_seed(seed)
        batch = self.encoder_hidden_states.shape[0]
        sample = torch.randn(batch, 4, 16, 16, generator=generator)
        return sample, torch.tensor(501.0), self.encoder_hidden_states, self.added_cond_kwargs


@pytest.fixture(scope="module")
def sdxl():
    return _Case("sdxl")


@pytest.fixture(scope="module")
def sd15():
    return _Case("sd15")


@pytest.fixture
def case(request, sdxl, sd15):
    return {"sdxl": sdxl, "sd15": sd15}[request.param]


# --- the denoising loop ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "patches", "gn"),
    [("sdxl", 2, "corrected"), ("sdxl", 4, "stale"), ("sd15", 2, "separate")],
    indirect=["case"],
)
def test_warmup_over_all_steps_is_single(case, patches, gn):
    """Steps 0..W are synchronous: with W >= T - 1 the run never leaves sync, and the recording
    layers (GroupNorm through E[x], E[x^2]) reproduce diffusers' UNet."""
    out = case.denoise(patches=patches, warmup_steps=STEPS - 1, gn=gn)
    assert _relative(out, case.single) < 1e-5


@pytest.mark.parametrize("gn", GN_RULES)
def test_one_patch_is_single(sdxl, gn):
    """P = 1: no neighbours, and every GN rule reduces to the patch's own (= global) moments."""
    out = sdxl.denoise(patches=1, warmup_steps=0, gn=gn)
    assert _relative(out, sdxl.single) < 1e-5


@pytest.mark.parametrize(("case", "patches"), [("sdxl", 2), ("sdxl", 4)], indirect=["case"])
def test_displaced_steps_differ(case, patches):
    """Displaced steps use stale context: they differ from single, and the GN rules differ."""
    outs = {gn: case.denoise(patches=patches, warmup_steps=1, gn=gn) for gn in GN_RULES}
    for gn, out in outs.items():
        assert 1e-4 < _relative(out, case.single) < 0.2, gn
    for (gn_a, a), (gn_b, b) in itertools.combinations(outs.items(), 2):
        assert _relative(a, b) > 1e-5, (gn_a, gn_b)


@pytest.mark.parametrize("case", ["sd15"], indirect=True)
def test_displaced_steps_differ_sd15(case):
    out = case.denoise(patches=2, warmup_steps=1, gn="corrected")
    assert 1e-4 < _relative(out, case.single) < 0.2


def test_naive(sdxl):
    assert _relative(sdxl.denoise(patches=1, mode="naive"), sdxl.single) < 1e-6
    assert _relative(sdxl.denoise(patches=2, mode="naive"), sdxl.single) > 1e-3


def test_naive_splits(sdxl):
    """Column slabs: one patch is single, two differ from single and from row slabs;
    "alternate" runs row slabs at step 0 (a one-step run equals "row") and column slabs at
    step 1."""
    assert _relative(sdxl.denoise(patches=1, mode="naive", split="col"), sdxl.single) < 1e-6
    runs = {split: sdxl.denoise(patches=2, mode="naive", split=split) for split in NAIVE_SPLITS}
    assert _relative(runs["col"], sdxl.single) > 1e-3
    assert _relative(runs["col"], runs["row"]) > 1e-3
    assert _relative(runs["alternate"], runs["row"]) > 1e-4
    assert _relative(runs["alternate"], runs["col"]) > 1e-4
    one_step = {
        split: sdxl.denoise(patches=2, mode="naive", split=split, num_inference_steps=1)
        for split in ("row", "alternate")
    }
    assert torch.equal(one_step["alternate"], one_step["row"])
    with pytest.raises(ValueError, match="split="):
        sdxl.denoise(patches=2, mode="naive", split="diagonal")


# --- one step ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "patches", "gn"),
    [
        ("sdxl", 2, "corrected"),
        ("sdxl", 4, "corrected"),
        ("sdxl", 4, "stale"),
        ("sdxl", 2, "sync"),
        ("sd15", 2, "corrected"),
    ],
    indirect=["case"],
)
def test_stale_equal_to_fresh_is_exact(case, patches, gn):
    """When the stale buffers hold exactly the current step's values (a synchronous step on the
    same input), a displaced step must reproduce the full-image prediction: this checks the conv
    halos (stride-2 downsamplers and upsampler convs included), the K/V assembly of
    self-attention and the GroupNorm moment rules, layer by layer."""
    unet = DisplacedUNet(case.unet, patches, gn)
    inputs = case.unet_inputs()
    with torch.no_grad():
        expected = case.unet(*inputs[:3], added_cond_kwargs=inputs[3]).sample
    full = unet.sync(*inputs)
    displaced = unet.displaced(*inputs)
    assert _relative(full, expected) < 1e-5
    assert _relative(displaced, expected) < 1e-5
    # A displaced step records the same fresh values as the full step: again exact.
    assert _relative(unet.displaced(*inputs), expected) < 1e-5
    # "separate" ignores the other patches: not exact.
    unet = DisplacedUNet(case.unet, patches, "separate")
    unet.sync(*inputs)
    assert _relative(unet.displaced(*inputs), expected) > 1e-4


@pytest.mark.parametrize("gn", ["corrected", "stale", "separate", "sync"])
def test_other_patches_are_stale(sdxl, gn):
    """In a displaced step, patch 0 sees patch 1's current latent only through conv_in's halo
    row (and, with gn="sync", through the current GroupNorm moments); everything else of patch 1
    comes from the previous step."""
    unet = DisplacedUNet(sdxl.unet, 2, gn)
    sample, timestep, text, added = sdxl.unet_inputs()
    unet.sync(sample, timestep, text, added)
    stale = dict(unet.state.stale)

    def patch_outputs(perturbed_rows):
        changed = sample.clone()
        changed[:, :, perturbed_rows] += 1.0
        unet.state.stale = dict(stale)
        return unet.displaced(changed, timestep, text, added).chunk(2, dim=2)

    base = patch_outputs(slice(0, 0))
    interior = patch_outputs(slice(9, 16))  # patch 1's rows, away from the boundary
    boundary = patch_outputs(slice(8, 9))  # patch 1's first row: conv_in's halo for patch 0
    assert _relative(interior[1], base[1]) > 1e-3
    if gn == "sync":
        assert _relative(interior[0], base[0]) > 1e-5
    else:
        assert torch.equal(interior[0], base[0])
    assert _relative(boundary[0], base[0]) > 1e-5


def test_hooked_layers_in_a_full_step():
    """The recording (full) phase leaves each hooked layer's output as diffusers computes it,
    and records what each of the P row slabs sends: its first and its last row (the conv's
    padding), each (B, W, C)."""
    from diffusers.models.downsampling import Downsample2D

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), Downsample2D(8, use_conv=True))
    model = randomize(model)
    x = torch.randn(2, 8, 12, 6) * 3 + 1
    with torch.no_grad():
        expected = model(x)
        state = _State(patches=3, gn="corrected")
        with _hooked(model, state):
            actual = model(x)
        normalized = model[0](x).chunk(3, dim=2)
    assert _relative(actual, expected) < 1e-6
    assert [(m.shape, n) for m, n in state.fresh["0"]] == [((2, 2, 4), 8 * 4 * 6)] * 3
    conv = {module: name for name, module in model.named_modules()}[model[1].conv]
    for recorded, slab in zip(state.fresh[conv], normalized, strict=True):
        assert set(recorded) == {"up", "down"}
        for message, row in (("up", 0), ("down", -1)):
            expected_row = slab[:, :, row].transpose(1, 2)  # (B, W, C)
            torch.testing.assert_close(recorded[message], expected_row, rtol=1e-5, atol=1e-5)
    # The hooks are gone afterwards.
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1].conv)
