"""Reading a diffusers or transformers `config.json` into a frozen dataclass, refusing what it
cannot model."""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")

# Bookkeeping keys that diffusers writes into every config.json.
BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})
# Keys that transformers' `PretrainedConfig` writes into the config.json of any model (some
# only older versions) and that do not change what inference computes: generation and task
# settings, training-only switches and bookkeeping.
TRANSFORMERS_GENERIC_KEYS = frozenset(
    {
        "_attn_implementation_autoset",
        "_commit_hash",
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "gradient_checkpointing",
        "id2label",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "model_type",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tie_word_embeddings",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
    }
)


def _as_tuples(value: Any) -> Any:
    """JSON lists (nested) -> tuples, so that configs are hashable."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def freeze(config: Any, class_name: str) -> None:
    """The `__post_init__` of a frozen config dataclass: lists become tuples, then the
    config's own `_problems()` (one message per problem) are raised together."""
    for field in dataclasses.fields(config):
        object.__setattr__(config, field.name, _as_tuples(getattr(config, field.name)))
    problems = config._problems()
    if problems:
        raise ValueError(f"unsupported {class_name} configuration:\n  " + "\n  ".join(problems))


def from_diffusers_config(
    cls: type[Config],
    config: Mapping[str, Any],
    *,
    class_name: str,
    fixed_keys: Mapping[str, Any],
    ignored_keys: frozenset[str] = frozenset(),
) -> Config:
    """`cls(**fields)` from a diffusers config dict of a `class_name` model.

    Keys that are fields of `cls` are passed on; `fixed_keys` are accepted only at the value
    given; `ignored_keys` (and diffusers' bookkeeping) do not change inference. Any other key,
    value or class is refused: all of them named in one ValueError.
    """
    problems = []
    if config.get("_class_name", class_name) != class_name:
        problems.append(f"_class_name: {config['_class_name']!r} is not a {class_name}")
    return _build(cls, config, class_name, fixed_keys, ignored_keys | BOOKKEEPING_KEYS, problems)


def from_transformers_config(
    cls: type[Config],
    config: Mapping[str, Any],
    *,
    model_type: str,
    name: str,
    fixed_keys: Mapping[str, Any] | None = None,
    ignored_keys: frozenset[str] = frozenset(),
    problems: Iterable[str] = (),
) -> Config:
    """`cls(**fields)` from a transformers config dict of a `model_type` model (`name` in
    messages, e.g. "CLIP text").

    Keys that are fields of `cls` are passed on; `fixed_keys` are accepted only at the value
    given; `ignored_keys` and `TRANSFORMERS_GENERIC_KEYS` do not change inference. Any other
    key or value, a model_type other than `model_type`, and the caller's own `problems` are
    refused: all of them named in one ValueError.
    """
    problems = list(problems)
    if config.get("model_type", model_type) != model_type:
        problems.insert(
            0, f"model_type: {config['model_type']!r} is not a {name} model ({model_type!r})"
        )
    ignored = ignored_keys | TRANSFORMERS_GENERIC_KEYS
    return _build(cls, config, name, fixed_keys or {}, ignored, problems)


def _build(
    cls: type[Config],
    config: Mapping[str, Any],
    name: str,
    fixed_keys: Mapping[str, Any],
    ignored_keys: frozenset[str],
    problems: list[str],
) -> Config:
    """`cls(**fields)` of `config`, or one ValueError naming `problems` and every key that is
    neither a field of `cls` nor ignored nor at its fixed value."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in config.items():
        if key in fields or key in ignored_keys:
            continue
        if key not in fixed_keys:
            problems.append(f"{key}: unknown key")
        elif value != fixed_keys[key]:
            problems.append(f"{key}: {value!r} is not supported (only {fixed_keys[key]!r})")
    if problems:
        raise ValueError(f"unsupported {name} configuration:\n  " + "\n  ".join(problems))
    return cls(**{k: v for k, v in config.items() if k in fields})
