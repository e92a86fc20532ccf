"""`jaxfusion bench analyze` on FLUX.1's transformer: the presets are the published
checkpoints' sizes; a tiny Flux pipeline folder (configs only) analyzed from shapes exchanges
exactly the image tokens' keys and values of the other patches (never a text token), and the
whole run is measured with and without T5 after encoding; --cfg-parallel is refused (Flux
runs no classifier-free guidance)."""

import json

import jax.numpy as jnp
import pytest

from jaxfusion.bench import analyze
from jaxfusion.bench.families import FluxFamily, family_of
from jaxfusion.bench.options import AnalyzeOptions
from jaxfusion.display import StageDisplay
from jaxfusion.models import FluxConfig
from jaxfusion.models.transformer_flux import early_blocks
from sharding.analysis import trace_step
from sharding.parallel import ParallelConfig

TRANSFORMER = dict(
    _class_name="FluxTransformer2DModel",
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,  # T5's d_model
    pooled_projection_dim=16,  # CLIP's hidden_size
    in_channels=16,  # 4 latent channels, packed 2x2
    axes_dims_rope=[2, 2, 4],
    guidance_embeds=True,
)
VAE = dict(
    _class_name="AutoencoderKL",
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
CLIP = dict(
    vocab_size=99,
    hidden_size=16,
    intermediate_size=32,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
)
T5 = dict(
    model_type="t5",
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
)
HEIGHT, WIDTH = 32, 24  # pixels; the VAE downscales by 2: a 16 x 12 latent, 8 x 6 tokens
DOWNSCALE = 2


def flux_folder(folder):
    """A FluxPipeline folder of the tiny networks' configs (no weights: analyze needs none)."""
    components = dict(transformer=TRANSFORMER, vae=VAE, text_encoder=CLIP, text_encoder_2=T5)
    for name, config in components.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return folder


def kv_bytes(patches: int, itemsize: int = 4) -> int:
    """What one device receives per step by the rule: each attention layer (double- and
    single-stream) all-gathers keys and values (2) of the image tokens of the other P - 1
    patches, heads x head_dim features each, batch 1; the text tokens are every device's
    own."""
    layers = TRANSFORMER["num_layers"] + TRANSFORMER["num_single_layers"]
    tokens_per_patch = (HEIGHT // DOWNSCALE // 2 // patches) * (WIDTH // DOWNSCALE // 2)
    features = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    return layers * (patches - 1) * 2 * 1 * tokens_per_patch * features * itemsize


def test_presets_are_the_published_checkpoints():
    """flux-dev's networks as shapes: the parameter counts of FLUX.1 [dev]'s transformer
    (11,901,408,320), T5-v1.1-XXL's encoder, CLIP ViT-L's text model and the 16-channel VAE;
    bfloat16, 2 bytes each (23.8 GB and 9.5 GB). [schnell] has no guidance embedding and
    encodes 256 T5 tokens to [dev]'s 512."""
    dev = analyze.flux_run("flux-dev", jnp.bfloat16)
    assert dev.weights_by_component() == {
        "transformer": 2 * 11_901_408_320,
        "text_encoder_2": 2 * 4_762_310_656,
        "text_encoder": 2 * 123_060_480,
        "vae": 2 * 83_819_683,
    }
    schnell = analyze.load_family("flux-schnell")
    assert isinstance(schnell, FluxFamily) and not schnell.config.guidance_embeds
    assert (dev.family.text_tokens, schnell.text_tokens) == (512, 256)
    assert dev.vae.config.latent_channels == dev.family.latent_channels == 16
    assert analyze.downscale_factor("flux-dev") == 8


def test_only_image_keys_and_values_travel():
    """Traced from shapes: the bytes a device receives per displaced step equal the rule
    (`kv_bytes`), whatever the text's length (T5's 512 or 256 tokens, or 7)."""
    config = FluxConfig.from_diffusers(TRANSFORMER)
    parallel = ParallelConfig(4, mode="displaced")
    received = set()
    for text_tokens in (512, 256, 7):
        family = FluxFamily(config, text_tokens)
        denoiser, sampling, latents = family.abstract_inputs(16, 12, jnp.float32)
        traced = trace_step(denoiser, sampling, latents, parallel, "displaced")
        received.add(sum(c.received_bytes for c in traced.collectives()))
    assert received == {kv_bytes(4)}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = flux_folder(tmp_path_factory.mktemp("flux") / "pipeline")
    out = folder.parent / "analysis.json"
    options = AnalyzeOptions(
        model=str(folder),
        heights=(HEIGHT,),
        width=WIDTH,
        devices=(1, 2, 4),
        dtype="float32",
        json=str(out),
    )
    analyze.run(options, StageDisplay())
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_flux_folder_exchanges_image_keys_and_values_only(records):
    """float32 (the CPU compiler keeps the collectives' dtype): the traced and the HLO
    traffic equal the rule, all of it all-gathers of K/V; the reference scheme adds the
    output's all-gather, 4 latent channels of the other patches' rows."""
    single, two, four = records
    assert single["comm_bytes_per_device_step"] == 0 and single["batch"] == 1
    for record, patches in ((two, 2), (four, 4)):
        expected = kv_bytes(patches)
        assert record["comm_bytes_per_device_step"] == expected
        assert record["comm_bytes_hlo_per_device_step"] == expected
        assert set(record["collectives"]) == {"all-gather"}
        output = (patches - 1) * (16 // patches) * 12 * 4 * 4
        assert record["comm_bytes_reference_per_device_step"] == expected + output
        # Stale buffers: this patch's own K/V message of each attention layer; the first
        # double-stream blocks (`early_blocks`: they send when they produce) also keep the
        # P messages they received, for the next step to read.
        layers = TRANSFORMER["num_layers"] + TRANSFORMER["num_single_layers"]
        message = expected // (patches - 1) // layers
        held = early_blocks(TRANSFORMER["num_layers"]) * patches * message
        assert record["stale_bytes_per_device"] == layers * message + held


@pytest.mark.slow
def test_tiny_flux_folder_whole_run(records):
    """Every row has the whole run: all four networks' weights held, and T5's freed after
    encoding, which needs no more."""
    for record in records:
        weights = record["weights_bytes_by_component"]
        assert set(weights) == {"transformer", "text_encoder_2", "text_encoder", "vae"}
        assert record["weights_bytes_per_device"] == sum(weights.values())
        whole = record["memory_bytes_generation_per_device"]
        assert whole > record["weights_bytes_per_device"]
        assert 0 < record["memory_bytes_generation_t5_freed_per_device"] <= whole


def test_cfg_parallel_is_refused_for_flux():
    """Before anything compiles: Flux has no CFG halves to put on separate devices."""
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        analyze.run(AnalyzeOptions(model="flux-dev", cfg_parallel=True, devices=(2,)))
    family = family_of(FluxConfig.from_diffusers(TRANSFORMER))
    with pytest.raises(ValueError, match="drop --cfg-parallel"):
        analyze.analyze(
            "tiny", family, HEIGHT, WIDTH, ParallelConfig(4, 2), "float32", downscale=DOWNSCALE
        )
