"""The Flax CLIP text encoders against transformers' on the same checkpoint files, their
conversion both ways, and the tokenizer loading."""

import copy
import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers_models import assert_same_parameters, randomize, relative_l2
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import load_file

from convert.state_dict import WeightMismatch
from jaxfusion.models import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    load_text_encoder,
    save_text_encoder,
)
from jaxfusion.models.scaled_dot_product import set_attention
from jaxfusion.tokenizer import load_tokenizer, tokenize, write_tokenizer

VOCAB_SIZE = 99
TINY = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=24,
    bos_token_id=0,
    pad_token_id=1,
)
# SD 1.x's text encoder: quick_gelu, the legacy eos_token_id 2 (pooled token = highest id).
# SDXL's text_encoder_2: gelu, with projection; here a real eos id that is not the highest
# (as after adding tokens), so that "first eos" and "highest id" pick different tokens.
MODELS = {
    "text": (transformers.CLIPTextModel, dict(TINY, hidden_act="quick_gelu", eos_token_id=2)),
    "projection": (
        transformers.CLIPTextModelWithProjection,
        dict(TINY, hidden_act="gelu", eos_token_id=VOCAB_SIZE - 3),
    ),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
# Chunks for the chunked attention kernel that divide neither 77 nor each other: the causal
# mask then cuts blocks in every way (whole blocks masked, partly masked, padded keys).
CHUNKS = dict(query_chunk=16, key_chunk=24)


def input_ids(eos_token_id: int, batch: int = 3, tokens: int = 77, seed: int = 0) -> np.ndarray:
    """Random ids: start token, words, an end-of-text token, then padding by that token (as
    SD's tokenizer pads). Position 1 holds a decoy for the wrong pooling rule: with the legacy
    eos_token_id 2 (the end-of-text token then being the highest id, as in CLIP's vocabulary)
    the id 2, otherwise an id above eos_token_id."""
    rng = np.random.default_rng(seed)
    legacy = eos_token_id == 2
    eos = VOCAB_SIZE - 1 if legacy else eos_token_id
    ids = rng.integers(3, eos, (batch, tokens))
    ids[:, 0] = 0
    ids[:, 1] = 2 if legacy else VOCAB_SIZE - 1
    for row, end in enumerate(rng.integers(3, tokens - 1, batch)):
        ids[row, end:] = eos
    return ids.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def jax_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray | list[np.ndarray]]:
    out = _forward(*nnx.split(model), ids)
    result = {
        "last_hidden_state": out.last_hidden_state,
        "hidden_states": list(out.hidden_states),
        "pooled_output": out.pooled_output,
    }
    if out.text_embeds is not None:
        result["text_embeds"] = out.text_embeds
    return jax.tree.map(lambda a: np.asarray(a.astype(np.float32)), result)


def torch_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray | list[np.ndarray]]:
    """transformers' outputs, called as diffusers calls it (no attention mask)."""
    with torch.no_grad():
        ids = torch.from_numpy(ids).long()
        out = model(ids, output_hidden_states=True)
        text_model = getattr(model, "text_model", model)
        result = {
            "last_hidden_state": out.last_hidden_state,
            "hidden_states": list(out.hidden_states),
            "pooled_output": text_model(ids).pooler_output,
        }
        if hasattr(out, "text_embeds"):
            result["text_embeds"] = out.text_embeds
    return jax.tree.map(lambda t: t.numpy(), result)


def assert_close(actual: dict, expected: dict, tolerance: float, label: str) -> None:
    """Every output of `expected` within `tolerance` (relative L2), each hidden state apart."""
    assert actual.keys() == expected.keys()
    layers = TINY["num_hidden_layers"]
    assert len(actual["hidden_states"]) == len(expected["hidden_states"]) == layers + 1
    for name, want in expected.items():
        got = actual[name]
        pairs = zip(got, want, strict=True) if name == "hidden_states" else [(got, want)]
        for i, (a, e) in enumerate(pairs):
            assert a.shape == e.shape, (label, name, i)
            error = relative_l2(a, e)
            print(f"{label} {name}[{i}]: relative L2 error {error:.2e}")
            assert error <= tolerance, (label, name, i, error)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """name -> (folder, the transformers model), written with `save_pretrained`."""
    saved = {}
    for seed, (name, (model_class, config)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = randomize(model_class(transformers.CLIPTextConfig(**config)), seed=seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        saved[name] = (folder, model)
    return saved


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize(
    "dtype",
    ["float32", *(pytest.param(d, marks=pytest.mark.slow) for d in ("bfloat16", "float16"))],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_transformers(saved_models, name, dtype, backend):
    folder, torch_model = saved_models[name]
    ids = input_ids(MODELS[name][1]["eos_token_id"])
    model = load_text_encoder(folder, dtype=dtype)
    set_attention(model, backend, **CHUNKS)
    assert type(model).__name__ == type(torch_model).__name__
    assert_close(jax_outputs(model, ids), torch_outputs(torch_model, ids), TOLERANCE[dtype], name)


def test_legacy_checkpoint_with_prefix_and_position_ids(saved_models, tmp_path):
    """A CLIPTextModel file as on the hub (keys under `text_model.`, plus the `position_ids`
    buffer) loads; a key that is no parameter or known buffer is still refused."""
    folder, torch_model = saved_models["text"]
    tensors = {
        f"text_model.{k}": v.numpy() for k, v in load_file(folder / "model.safetensors").items()
    }
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    ids = input_ids(2)
    expected = torch_outputs(torch_model, ids)
    assert_close(jax_outputs(load_text_encoder(tmp_path), ids), expected, 1e-5, "legacy")

    tensors["text_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightMismatch, match=r"text_model\.extra\.weight"):
        load_text_encoder(tmp_path)


def test_pipeline_folder_text_encoder_2_fp16_variant(saved_models, tmp_path):
    _, torch_model = saved_models["projection"]
    copy.deepcopy(torch_model).half().save_pretrained(tmp_path / "text_encoder_2", variant="fp16")
    half = transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path / "text_encoder_2", variant="fp16"
    )
    model = load_text_encoder(tmp_path, "text_encoder_2", variant="fp16")
    assert isinstance(model, CLIPTextModelWithProjection)
    ids = input_ids(MODELS["projection"][1]["eos_token_id"])
    expected = torch_outputs(half.float().eval(), ids)
    assert_close(jax_outputs(model, ids), expected, 1e-5, "fp16 file")


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_flax_transformers_flax(tmp_path, name):
    """A Flax encoder written with save_text_encoder is loaded by transformers without
    missing or unexpected keys, computes the same, and loads back identically."""
    torch_class, raw = MODELS[name]
    config = CLIPTextConfig(**raw)
    flax_class = CLIPTextModelWithProjection if name == "projection" else CLIPTextModel
    model = flax_class(config, rngs=nnx.Rngs(3))
    save_text_encoder(model, tmp_path)
    torch_model, info = torch_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = input_ids(raw["eos_token_id"])
    assert_close(jax_outputs(model, ids), torch_outputs(torch_model.eval(), ids), 1e-5, name)

    reloaded = load_text_encoder(tmp_path)
    assert reloaded.config == config
    assert_same_parameters(model, reloaded)


def test_config_refuses_unsupported_values():
    with pytest.raises(ValueError, match="hidden_act: 'relu'"):
        CLIPTextConfig.from_transformers({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="use_attention_mask: unknown key"):
        CLIPTextConfig.from_transformers({"use_attention_mask": True})
    with pytest.raises(ValueError, match="model_type: 'clip_vision_model'"):
        CLIPTextConfig.from_transformers({"model_type": "clip_vision_model"})
    legacy = {"torch_dtype": "float16", "dropout": 0.0, "_name_or_path": "x", "eos_token_id": 2}
    assert CLIPTextConfig.from_transformers(legacy).eos_token_id == 2
    config = CLIPTextConfig(**MODELS["projection"][1])
    assert CLIPTextConfig.from_transformers(config.to_transformers()) == config


WORDS = "a photo of an astronaut riding horse on the moon cat dog red blue big painting".split()  # noqa: SIM905


@pytest.mark.parametrize(
    "subfolder, pad_token", [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]
)
def test_tokenizer(tmp_path, monkeypatch, subfolder, pad_token):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = write_tokenizer(tmp_path / subfolder, WORDS, pad_token=pad_token)
    tokenizer = load_tokenizer(tmp_path, subfolder)
    prompts = ["a photo of an astronaut riding a horse on the moon", "A red CAT,  big dog"]
    ids = tokenize(tokenizer, prompts)
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / subfolder)
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, expected)
    words = [vocab[w + "</w>"] for w in prompts[0].split()]
    pad = vocab[pad_token]
    np.testing.assert_array_equal(ids[0], [0, *words, 1] + [pad] * (77 - len(words) - 2))

    long_words = WORDS * 6
    kept, removed = long_words[:75], long_words[75:]
    with pytest.warns(UserWarning, match="truncated") as record:
        long_ids = tokenize(tokenizer, " ".join(long_words))
    assert " ".join(removed) in str(record[0].message)
    np.testing.assert_array_equal(long_ids[0], [0, *(vocab[w + "</w>"] for w in kept), 1])


def test_tokenizer_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_2/"):
        load_tokenizer(tmp_path, "tokenizer_2")
