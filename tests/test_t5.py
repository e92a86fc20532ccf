"""The Flax T5 encoder against transformers' `T5EncoderModel` on the same checkpoint files,
its conversion both ways, its configuration, and the T5 tokenizer (Flux's `tokenizer_2`)."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers_models import assert_same_parameters, randomize, relative_l2
from flax import nnx
from pipelines import write_t5_tokenizer
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers.models.t5.modeling_t5 import T5Attention

from convert.state_dict import WeightMismatch
from jaxfusion.models import T5Config, T5EncoderModel, load_t5_encoder, save_t5_encoder
from jaxfusion.models.t5 import relative_position_buckets
from jaxfusion.tokenizer import load_t5_tokenizer, tokenize_t5

TINY = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=20,
)
# T5 v1.1 (Flux's t5-v1_1-xxl): gated tanh-GELU; original T5: ReLU.
MODELS = {
    "gated-gelu": dict(TINY, feed_forward_proj="gated-gelu"),
    "relu": dict(TINY, feed_forward_proj="relu"),
}
# More tokens than relative_attention_max_distance (20): the distances 8..19 fall in the
# logarithmic buckets, those from 20 on in the last one.
TOKENS = 45
# Relative L2 error against transformers in the same dtype. Measured (transformers 5.25,
# torch 2.13, CPU), gated-gelu and relu: float32 4.7e-7 and 2.5e-7; bfloat16 9.3e-3 and
# 6.3e-3 (each side is about 1e-2 and 8e-3 off transformers' float32 output: rounding of
# either); float16, transformers' `wo` in float32, 9.1e-4 and 5.5e-4.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def input_ids(batch: int = 2, tokens: int = TOKENS, seed: int = 0) -> np.ndarray:
    """Random ids, each row ending in `</s>` (1) and padding (0), as Flux's tokenizer_2
    gives them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, TINY["vocab_size"], (batch, tokens))
    for row, end in enumerate(rng.integers(5, tokens - 1, batch)):
        ids[row, end] = 1
        ids[row, end + 1 :] = 0
    return ids.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def jax_output(model: T5EncoderModel, ids: np.ndarray, mask=None) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), ids, mask).astype(np.float32))


def torch_output(model, ids: np.ndarray, mask=None) -> np.ndarray:
    """transformers' last_hidden_state, as Flux calls it (no attention mask) by default."""
    with torch.no_grad():
        mask = None if mask is None else torch.from_numpy(mask)
        out = model(torch.from_numpy(ids).long(), attention_mask=mask).last_hidden_state
    return out.float().numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float, label: str):
    assert actual.shape == expected.shape, label
    error = relative_l2(actual, expected)
    print(f"{label}: relative L2 error {error:.2e}")
    assert error <= tolerance, (label, error)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """name -> (folder, the transformers model), written with `save_pretrained`."""
    saved = {}
    for seed, (name, config) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = randomize(transformers.T5EncoderModel(transformers.T5Config(**config)), seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        saved[name] = (folder, model)
    return saved


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_transformers(saved_models, name, dtype):
    """Our encoder loaded in `dtype` against transformers' loaded in the same dtype."""
    folder, torch_model = saved_models[name]
    if dtype != "float32":
        torch_model = transformers.T5EncoderModel.from_pretrained(
            folder, dtype=TORCH_DTYPES[dtype]
        ).eval()
    model = load_t5_encoder(folder, dtype=dtype)
    assert model.dtype == dtype and model.config == T5Config(**MODELS[name])
    ids = input_ids()
    out = jax_output(model, ids)
    assert out.shape == (2, TOKENS, TINY["d_model"])
    assert_close(out, torch_output(torch_model, ids), TOLERANCE[dtype], f"{name} {dtype}")


def test_attention_mask(saved_models):
    """With a mask (which Flux does not pass) the masked keys get no weight, as in
    transformers."""
    folder, torch_model = saved_models["gated-gelu"]
    ids = input_ids()
    mask = (ids != 0).astype(np.int64)
    mask[:, -1] = 0  # rows with and without padding keep a distinct masked tail
    expected = torch_output(torch_model, ids, mask)
    assert_close(jax_output(load_t5_encoder(folder), ids, mask), expected, 1e-5, "masked")
    assert relative_l2(expected, torch_output(torch_model, ids)) > 1e-3  # the mask matters


@pytest.mark.parametrize(
    "buckets, max_distance, length", [(32, 128, 512), (32, 20, 64), (8, 9, 40)]
)
def test_position_buckets(buckets, max_distance, length):
    """The bucket table equals transformers' for Flux's configuration (32 buckets, distance
    128, 512 tokens: its exact powers of two are where a float32 log one ulp off would
    move a distance into the next bucket) and for small ones."""
    position = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        position[None, :] - position[:, None],
        bidirectional=True,
        num_buckets=buckets,
        max_distance=max_distance,
    )
    np.testing.assert_array_equal(
        relative_position_buckets(length, buckets, max_distance), expected.numpy()
    )


def test_tied_embedding_keys(saved_models, tmp_path):
    """A file with the token embedding under both tied names, or under the encoder's name
    alone, loads; `shared.weight` is the one read when both are there."""
    folder, torch_model = saved_models["gated-gelu"]
    tensors = {k: v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors
    ids = input_ids()
    expected = torch_output(torch_model, ids)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    embedding = tensors.pop("shared.weight")
    for label, extra in [
        ("both", {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding * 0}),
        ("encoder's", {"encoder.embed_tokens.weight": embedding}),
    ]:
        save_file({**tensors, **extra}, tmp_path / "model.safetensors")
        assert_close(jax_output(load_t5_encoder(tmp_path), ids), expected, 1e-5, label)


def test_wrong_shape_refused(saved_models, tmp_path):
    folder, _ = saved_models["relu"]
    tensors = {k: v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    key = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
    tensors[key] = tensors[key][:-1]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightMismatch, match=rf"{key}: checkpoint \(36, 32\), model \(37, 32\)"):
        load_t5_encoder(tmp_path)


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_flax_transformers_flax(tmp_path, name):
    """A Flax encoder written with save_t5_encoder into a pipeline's text_encoder_2/ is
    loaded by transformers without missing or unexpected keys, computes the same, and
    loads back identically."""
    config = T5Config(**MODELS[name])
    model = T5EncoderModel(config, rngs=nnx.Rngs(3))
    save_t5_encoder(model, tmp_path / "text_encoder_2")
    torch_model, info = transformers.T5EncoderModel.from_pretrained(
        tmp_path / "text_encoder_2", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = input_ids()
    assert_close(jax_output(model, ids), torch_output(torch_model.eval(), ids), 1e-5, name)

    reloaded = load_t5_encoder(tmp_path)
    assert reloaded.config == config
    assert_same_parameters(model, reloaded)


# The keys of FLUX.1's text_encoder_2/config.json (google/t5-v1_1-xxl's encoder, written by
# transformers 4.x).
FLUX_T5 = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "vocab_size": 32128,
}


def test_config():
    config = T5Config.from_transformers(FLUX_T5)
    assert (config.dense_act_fn, config.is_gated_act) == ("gelu_new", True)
    assert T5Config.from_transformers(config.to_transformers()) == config
    params = nnx.state(T5EncoderModel.abstract(config), nnx.Param)
    assert sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(params)) == 4762310656
    # transformers' rule: a plain "gelu" is the exact GELU, "gated-gelu" the tanh one.
    assert (T5Config(feed_forward_proj="gelu").dense_act_fn, T5Config().is_gated_act) == (
        "gelu",
        False,
    )

    with pytest.raises(ValueError, match="feed_forward_proj: 'gated-silu' is not supported"):
        T5Config.from_transformers({"feed_forward_proj": "gated-silu"})
    refused = {
        "model_type": "umt5",
        "is_decoder": True,
        "dense_act_fn": "relu",
        "feed_forward_proj": "gated-gelu",
        "rope_theta": 1.0,
    }
    with pytest.raises(ValueError) as error:
        T5Config.from_transformers(refused)
    for problem in (
        "model_type: 'umt5' is not a T5 model ('t5')",
        "is_decoder: True is not supported (only False)",
        "dense_act_fn: 'relu' disagrees with feed_forward_proj (which means 'gelu_new')",
        "rope_theta: unknown key",
    ):
        assert problem in str(error.value)


WORDS = "a photo of an astronaut riding horse on the moon cat dog red blue big painting".split()  # noqa: SIM905


def test_t5_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = write_t5_tokenizer(tmp_path / "tokenizer_2", WORDS)
    tokenizer = load_t5_tokenizer(tmp_path)
    reference = transformers.T5TokenizerFast.from_pretrained(tmp_path / "tokenizer_2")
    length = 12
    long_prompt = " ".join(WORDS)  # 16 words: 11 kept, then `</s>`
    prompts = ["a photo of an astronaut riding a horse", "A red CAT,  big dog", long_prompt]
    with pytest.warns(UserWarning, match="truncated to T5's 12 tokens") as record:
        ids = tokenize_t5(tokenizer, prompts, max_sequence_length=length)
    assert " ".join(WORDS[length - 1 :]) in str(record[0].message)
    assert ids.shape == (3, length) and ids.dtype == np.int32
    expected = reference(prompts, padding="max_length", max_length=length, truncation=True)
    np.testing.assert_array_equal(ids, expected.input_ids)
    words = [vocab["▁" + w] for w in prompts[0].split()]
    np.testing.assert_array_equal(ids[0], [*words, 1] + [0] * (length - len(words) - 1))
    np.testing.assert_array_equal(ids[2], [vocab["▁" + w] for w in WORDS[: length - 1]] + [1])
    # Flux's default length, beyond this tokenizer's model_max_length (16).
    assert tokenize_t5(tokenizer, prompts[:1]).shape == (1, 512)


def test_t5_tokenizer_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json or spiece\.model"):
        load_t5_tokenizer(tmp_path)
