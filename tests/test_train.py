"""`jaxfusion train` on a few steps: it writes a pipeline folder that both jaxfusion and
diffusers load, with its loss curve and record, the same seed gives the same weights, and
training continues from a trained folder (`--from`) at another size, keeping its VAE; the
losses the phases record follow their formulas (numpy, float64)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxfusion import cli
from jaxfusion.builtin import builtin_model_path
from jaxfusion.cli.train import train_options
from jaxfusion.tokenizer import tokenize
from jaxfusion.train import shapes, trainer
from jaxfusion.train.config import TrainConfig
from jaxfusion.train.noise import pyramid_noise

STEPS = ["--vae-steps", "2", "--unet-steps", "1", "--scale-steps", "0"]


@pytest.mark.slow
def test_train_writes_a_loadable_pipeline_deterministically(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    snapshots = tmp_path / "snapshots"
    train = ["train", "--out", str(first), *STEPS]
    assert cli.main([*train, "--snapshots", str(snapshots), "--snapshot-every", "1"]) == 0
    assert cli.main(train) == 2  # exists: refused
    assert cli.main(["train", "--out", str(second), *STEPS]) == 0

    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = "model.safetensors" if "text" in component else "diffusion_pytorch_model.safetensors"
        a, b = (load_file(folder / component / name) for folder in (first, second))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{component}: {key}")

    record = json.loads((first / "training.json").read_text())
    assert record["config"]["vae_steps"] == 2 and record["config"]["unet_steps"] == 1
    assert record["config"]["scale_steps"] == 0 and record["started_from"] is None
    assert (first / "loss.png").stat().st_size > 0
    snapshot = json.loads((snapshots / "step-1" / "training.json").read_text())
    assert snapshot["diffusion_steps"] == 1 == record["diffusion_steps"]

    from jaxfusion import diffusers_backend
    from jaxfusion.pipelines import load_pipeline

    ours = load_pipeline(first)
    theirs = diffusers_backend.load_diffusers_pipeline(first)
    assert ours.vae.config.scaling_factor == theirs.vae.config.scaling_factor
    assert ours.vae.config.scaling_factor != 1.0  # set from the trained VAE's latents

    # Continuing from `first` at another size (a small one: the default scales' 256x256
    # programs take minutes to compile here), two rounds on pyramid noise: its VAE is kept,
    # the UNet moves; new text encoders (another seed, so that they differ from `first`'s
    # initial ones) have the asked layers and sinusoidal position embeddings.
    config = TrainConfig(
        seed=1,
        unet_steps=0,
        scale_steps=1,
        scale_rounds=2,
        scales=((32, 2),),
        text_encoder_layers=3,
        sinusoidal_positions=True,
    )
    continued, history = trainer.train(config, start=first, new_text_encoders=True)
    assert len(history.unet) == 2 and set(history.seconds) == {"unet_scales", "unet_scales_2"}
    for old, new in zip(parameters(ours.vae), parameters(continued.vae), strict=True):
        np.testing.assert_array_equal(old, new)
    pairs = zip(parameters(ours.unet), parameters(continued.unet), strict=True)
    assert any(not np.array_equal(old, new) for old, new in pairs)
    encoders = zip(ours.models.text_encoders, continued.models.text_encoders, strict=True)
    for old, new in encoders:
        assert len(old.text_model.encoder.layers) == 2 and len(new.text_model.encoder.layers) == 3
        old, new = old.text_model.embeddings, new.text_model.embeddings
        tokens = np.asarray(new.token_embedding.embedding[...])
        assert np.abs(tokens - np.asarray(old.token_embedding.embedding[...])).mean() > 0.5
        table = np.asarray(new.position_embedding.embedding[...])
        # two Adam steps of at most the peak learning rate each from the formula
        np.testing.assert_allclose(table, sinusoids(*table.shape), atol=2 * 5e-4 + 1e-6)


def sinusoids(positions: int, dim: int) -> np.ndarray:
    """float64: row p = sqrt(2) [sin(p / 100^(2i/dim)) for i < dim/2, then the cosines]."""
    table = np.zeros((positions, dim))
    for p in range(positions):
        for i in range(dim // 2):
            angle = p / 100 ** (2 * i / dim)
            table[p, i], table[p, dim // 2 + i] = np.sin(angle), np.cos(angle)
    return table * np.sqrt(2)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--new-text-encoders"], "--from"),
        (["--from", "FOLDER", "--text-encoder-layers", "3"], "--new-text-encoders"),
        (["--text-encoder-heads", "3"], "--text-encoder-heads"),
        (["--text-encoder-layers", "0"], "--text-encoder-layers"),
        (["--object-counts", "0.5", "0.5", "0.5"], "--object-counts"),
        (["--unplaced", "1.5"], "--unplaced"),
        (["--decoder-sizes", "96"], "--decoder-sizes"),
    ],
)
def test_train_refuses_flags_that_do_not_apply_before_loading(tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert cli.main(["train", "--out", str(out), *flags]) == 2  # before reading FOLDER
    assert named in capsys.readouterr().err and not out.exists()


def test_decoder_sizes_keep_the_pixels_of_a_step():
    args = cli.build_parser().parse_args(["train", "--out", "x", "--decoder-sizes", "64", "256"])
    assert train_options(args).config.decoder_scales == ((64, 16), (256, 1))
    default = train_options(cli.build_parser().parse_args(["train", "--out", "x"])).config
    assert default.decoder_scales == ((64, 16), (128, 4), (256, 1))


def test_training_continues_from_the_shipped_model_by_name():
    pipe, history = trainer.train(TrainConfig(unet_steps=0, scale_rounds=0), start="builtin")
    shipped = json.loads((builtin_model_path() / "vae" / "config.json").read_text())
    assert pipe.models.vae.config.scaling_factor == shipped["scaling_factor"] != 1.0
    assert history.seconds == {}


def parameters(module: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))]


def test_scenes_are_deterministic_and_captions_use_the_vocabulary():
    images, captions = shapes.batch(seed=3, index=7, batch_size=8, size=32)
    again, captions_again = shapes.batch(seed=3, index=7, batch_size=8, size=32)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    assert images.shape == (8, 32, 32, 3) and images.min() >= -1 and images.max() <= 1
    assert {word for caption in captions for word in caption.split()} <= set(shapes.WORDS)


@pytest.mark.parametrize("objects", [1, 2, 3])
def test_scenes_hold_the_number_of_objects_asked_for(objects):
    counts = tuple(float(n == objects) for n in (1, 2, 3))
    _, captions = shapes.batch(seed=5, index=0, batch_size=16, size=32, object_counts=counts)
    assert all(caption.count(" and ") == objects - 1 for caption in captions)


def test_scenes_by_default_hold_one_object_half_the_time_else_two_or_three_alike():
    _, captions = shapes.batch(seed=5, index=0, batch_size=2000, size=4)
    shares = np.bincount([caption.count(" and ") + 1 for caption in captions]) / 2000
    # binomial standard deviations at n = 2000: 0.011 and 0.0097
    np.testing.assert_allclose(shares[1:], [0.5, 0.25, 0.25], atol=0.04)


def test_unplaced_captions_leave_out_every_place_in_the_asked_share():
    """A caption names its objects' places or none of them, and names none in the asked
    share; without the option every caption names them."""
    place_words = {"top", "bottom", "left", "right", "center"}
    _, captions = shapes.batch(5, 0, 2000, 4, (0.4, 0.45, 0.15), unplaced=0.35)
    unnamed = [not place_words & set(caption.split()) for caption in captions]
    for caption, none in zip(captions, unnamed, strict=True):
        named_phrases = [bool(place_words & set(p.split())) for p in caption.split(" and ")]
        assert none or sum(named_phrases) == caption.count(" and ") + 1, caption
    # binomial standard deviation at n = 2000: 0.011
    assert np.mean(unnamed) == pytest.approx(0.35, abs=0.04)
    _, named = shapes.batch(5, 0, 200, 4, (0.4, 0.45, 0.15))
    assert all(place_words & set(caption.split()) for caption in named)


def test_decoder_phase_trains_the_decoder_alone_on_every_size():
    """Two decoder steps at 32 and 16 pixels move the decoder and post_quant_conv, and
    nothing of the encoder (so the latent space a UNet learned stays); the first loss is the
    reconstruction error of the initial weights at 32 pixels (`first_vae_loss`)."""
    config = dataclasses.replace(CONFIG, decoder_steps=2, decoder_scales=((32, 2), (16, 3)))
    vae = trainer.initial_pipeline(config).models.vae
    phase = trainer.decoder_phase(config)
    expected, _ = first_vae_loss(vae, phase, config)
    before = {path: np.asarray(leaf) for path, leaf in nnx.to_flat_state(nnx.state(vae))}
    losses = []
    trainer.train_vae(vae, phase, config, losses, trainer.no_progress)
    assert len(losses) == 2 and losses[0] == pytest.approx(expected, rel=1e-5)
    after = dict(nnx.to_flat_state(nnx.state(vae)))
    moved = {path[0] for path, old in before.items() if not np.array_equal(old, after[path])}
    assert moved == {"decoder", "post_quant_conv"}


def block_mean_std(noise: jax.Array, block: int) -> float:
    """The standard deviation of the means of (block x block) blocks of (B, h, w, C) noise."""
    b, h, w, c = noise.shape
    blocks = np.asarray(noise, np.float64).reshape(b, h // block, block, w // block, block, c)
    return float(blocks.mean(axis=(2, 4)).std())


def test_pyramid_noise_keeps_coarse_blobs_at_256_as_strong_as_white_noise_at_64():
    key = jax.random.key(0)
    white = pyramid_noise(key, (64, 16, 16, 4), discount=0.0)
    np.testing.assert_array_equal(white, jax.random.normal(key, (64, 16, 16, 4)))
    noise = pyramid_noise(key, (64, 64, 64, 4), TrainConfig().scale_noise_discount)
    np.testing.assert_allclose(np.std(np.asarray(noise), axis=(1, 2, 3)), 1.0, rtol=1e-5)
    # A shape covers about 4x4 latent pixels at 64x64 and 16x16 at 256x256; white noise
    # averaged over n pixels has standard deviation 1 / sqrt(n).
    assert block_mean_std(white, 4) == pytest.approx(1 / 4, rel=0.1)
    assert block_mean_std(noise, 16) >= 1 / 4
    assert block_mean_std(pyramid_noise(key, (64, 64, 64, 4), 0.0), 16) < 1 / 12


def scaled_linear_alpha_bar() -> np.ndarray:
    """float64 alpha_bar_t of the trainer's noise schedule (scaled_linear, betas 0.00085 to
    0.012 over 1000 steps): the products of 1 - beta."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas)


CONFIG = TrainConfig(image_size=32, vae_batch_size=2, kl_weight=0.5, unconditional_probability=0.5)


def first_vae_loss(vae, phase: trainer.AutoencoderPhase, config: TrainConfig):
    """(loss, KL term) of an autoencoder phase's first step, numpy float64 from the VAE's
    outputs: the MSE of the reconstruction of a latent sample + kl_weight x the mean over
    images of sum 1/2 (mu^2 + sigma^2 - 1 - log sigma^2). The batch and the sample are the
    trainer's draws for step 0."""
    size, batch_size = phase.scales[0]
    images, _ = shapes.batch(phase.data_seed, 0, batch_size, size, config.object_counts)
    posterior = vae.encode(images)
    sample = posterior.sample(jax.random.fold_in(jax.random.key(phase.data_seed), 0))
    reconstruction = np.asarray(vae.decode(sample), np.float64)
    mu, log_var = (np.asarray(a, np.float64) for a in (posterior.mean, posterior.logvar))
    kl = 0.5 * (mu**2 + np.exp(log_var) - 1 - log_var).sum(axis=(1, 2, 3)).mean()
    return np.mean((reconstruction - images) ** 2) + config.kl_weight * kl, kl


def test_vae_loss_follows_the_formula():
    """The loss the VAE phase records for its first step (the initial weights) against
    `first_vae_loss`, with a kl_weight that makes the KL term count."""
    config = dataclasses.replace(CONFIG, vae_steps=1)
    vae = trainer.initial_pipeline(config).models.vae
    phase = trainer.vae_phase(config)
    expected, kl = first_vae_loss(vae, phase, config)
    losses = []
    trainer.train_vae(vae, phase, config, losses, trainer.no_progress)
    assert kl > 1 and losses[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_diffusion_loss_follows_the_formula():
    """The loss a diffusion phase records for its first step (the initial weights) against
    numpy float64 from the models' outputs: the mean over images of min(SNR_t, gamma) /
    SNR_t x the MSE of the UNet's epsilon prediction on sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) eps, x0 the VAE's latent means times its scaling factor, the text
    conditioning zeroed for dropped captions, time ids the image's size. The draws (dropped
    captions, t, pyramid noise eps) are the trainer's, jax.random from the step's key."""
    pipe = trainer.initial_pipeline(CONFIG)
    vae = pipe.models.vae
    vae.config = dataclasses.replace(vae.config, scaling_factor=0.5)
    phase = trainer.Phase("unet", "", 1, 1e-3, ((32, 4),), data_seed=7,
                          random_size_ids=False, noise_discount=0.7)  # fmt: skip
    images, captions = shapes.batch(phase.data_seed, 0, 4, 32, None)
    token_ids = tuple(tokenize(tokenizer, captions) for tokenizer in pipe.tokenizers)
    time_ids = np.tile(np.float32([32, 32, 0, 0, 32, 32]), (4, 1))
    latents = 0.5 * np.asarray(jax.jit(lambda x: vae.encode(x).mean)(images), np.float64)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(phase.data_seed), 0), 3)
    keep = np.asarray(jax.random.uniform(keys[0], (4,))) >= CONFIG.unconditional_probability
    t = np.asarray(jax.random.randint(keys[1], (4,), 0, 1000))
    noise = np.asarray(pyramid_noise(keys[2], latents.shape, phase.noise_discount), np.float64)
    assert keep.any() and not keep.all()  # both kinds of caption in the batch
    alpha_bar = scaled_linear_alpha_bar()
    a = alpha_bar[t][:, None, None, None]
    noisy = np.sqrt(a) * latents + np.sqrt(1 - a) * noise
    conditioning = pipe.encode_prompt(pipe.models, token_ids, time_ids, None)
    states = np.asarray(conditioning.encoder_hidden_states) * keep[:, None, None]
    pooled = np.asarray(conditioning.text_embeds) * keep[:, None]
    # One compiled program, not hundreds of eagerly dispatched operations.
    prediction = jax.jit(pipe.models.unet)(noisy.astype(np.float32), t, states, pooled, time_ids)
    snr = alpha_bar / (1 - alpha_bar)
    weight = np.minimum(snr, CONFIG.min_snr_gamma)[t] / snr[t]
    errors = ((np.asarray(prediction, np.float64) - noise) ** 2).mean(axis=(1, 2, 3))
    losses = []
    trainer.train_diffusion(pipe, phase, CONFIG, losses, trainer.no_progress, lambda *_: None)
    assert losses[0] == pytest.approx(np.mean(weight * errors), rel=1e-5)
