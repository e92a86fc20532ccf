"""The tokenizers of a pipeline folder, read offline: CLIP's (transformers' `CLIPTokenizer`;
SD's `tokenizer`, SDXL's two, Flux's first) and T5's (`T5TokenizerFast`, Flux's `tokenizer_2`),
and prompts -> the token ids the text encoders take, as diffusers' pipelines tokenize them."""

from __future__ import annotations

import itertools
import json
import logging
import string
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5TokenizerFast

# transformers' model_max_length when tokenizer_config.json does not set one.
_UNSET_MAX_LENGTH = 10**6
# FluxPipeline's default max_sequence_length, the T5 encoder's tokens per prompt (FLUX.1
# schnell's examples pass 256).
T5_MAX_SEQUENCE_LENGTH = 512


def load_tokenizer(path: str | Path, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """transformers' CLIPTokenizer from local files only (nothing is downloaded).

    Args:
      path: a diffusers pipeline folder (its `subfolder` is used) or a tokenizer folder
        (`vocab.json` + `merges.txt`, or `tokenizer.json`; `tokenizer_config.json`).
      subfolder: "tokenizer" (SD, SDXL's first encoder) or "tokenizer_2" (SDXL's second,
        which pads with "!" instead of "<|endoftext|>").
    """
    return _load_tokenizer(
        path, subfolder, "CLIPTokenizer", ("vocab.json", "tokenizer.json"), "SD tokenizers have 77"
    )


def load_t5_tokenizer(path: str | Path, subfolder: str = "tokenizer_2") -> T5TokenizerFast:
    """transformers' T5TokenizerFast (Flux's `tokenizer_2`) from local files only.

    Args:
      path: a diffusers pipeline folder (its `subfolder` is used) or a tokenizer folder
        (`tokenizer.json`, or the SentencePiece model `spiece.model`; `tokenizer_config.json`).
      subfolder: the tokenizer's subfolder in pipeline folders.
    """
    return _load_tokenizer(
        path,
        subfolder,
        "T5TokenizerFast",
        ("tokenizer.json", "spiece.model"),
        f"Flux's has {T5_MAX_SEQUENCE_LENGTH}",
    )


def _load_tokenizer(
    path: str | Path, subfolder: str, class_name: str, vocabularies: tuple[str, ...], lengths: str
) -> Any:
    """transformers' tokenizer `class_name` from `path`, or from its `subfolder`, whichever
    holds one of the `vocabularies` files; one that sets no model_max_length is refused
    (`lengths` says what it should be)."""
    try:
        tokenizer_class = import_tokenizer(class_name)
    except ImportError as error:
        raise ImportError(
            "tokenizing prompts needs the transformers package: pip install transformers"
        ) from error
    folder = Path(path)
    if not _has_vocabulary(folder, vocabularies):
        folder = folder / subfolder
    if not _has_vocabulary(folder, vocabularies):
        raise FileNotFoundError(
            f"{path} is neither a tokenizer folder ({' or '.join(vocabularies)}) nor a "
            f"pipeline folder with a {subfolder}/ subfolder holding one"
        )
    tokenizer = tokenizer_class.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length >= _UNSET_MAX_LENGTH:
        raise ValueError(f"{folder} sets no model_max_length (tokenizer_config.json); {lengths}")
    return tokenizer


class _NoModelsNotice(logging.Filter):
    """Drops transformers' notice, when it is imported without PyTorch, that its models
    will not be available ("PyTorch was not found. Models won't be available ..."):
    jaxfusion uses its tokenizers only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Models won't be available" not in record.getMessage()


def import_tokenizer(class_name: str) -> type:
    """transformers' tokenizer class `class_name` (`CLIPTokenizer`, `T5TokenizerFast`),
    imported as quietly as the command imports it: a filter on transformers' logger drops
    its no-PyTorch notice during the import alone, and nothing else of the user's logging or
    environment changes."""
    logger = logging.getLogger("transformers")
    quiet = _NoModelsNotice()
    logger.addFilter(quiet)
    try:
        import transformers

        return getattr(transformers, class_name)
    finally:
        logger.removeFilter(quiet)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Writes the tokenizer as transformers does, plus `vocab.json` and `merges.txt`, which
    transformers 5 no longer writes and earlier versions need."""
    tokenizer.save_pretrained(folder)
    if not (Path(folder) / "vocab.json").is_file():
        tokenizer.backend_tokenizer.model.save(str(folder))


def _has_vocabulary(folder: Path, vocabularies: tuple[str, ...]) -> bool:
    return any((folder / name).is_file() for name in vocabularies)


def tokenize(
    tokenizer: CLIPTokenizer | T5TokenizerFast,
    prompts: str | Sequence[str],
    max_length: int | None = None,
) -> np.ndarray:
    """Prompts -> (B, max_length) int32 token ids, as diffusers' pipelines tokenize them
    (`padding="max_length", truncation=True`): CLIP's start token, the prompt, the end token,
    then the tokenizer's pad token up to `max_length` (default: the tokenizer's
    model_max_length, 77 for CLIP); T5's the same without a start token (see
    `tokenize_t5`). A longer prompt is cut to fit, with a warning naming the text that was
    dropped (as diffusers warns)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = tokenizer.model_max_length if max_length is None else max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    ).input_ids
    model = type(tokenizer).__name__.removesuffix("Fast").removesuffix("Tokenizer")
    for prompt_ids in tokenizer(prompts, verbose=False).input_ids:
        if len(prompt_ids) > max_length:
            removed = tokenizer.decode(prompt_ids[max_length - 1 : -1])
            warnings.warn(
                f"prompt truncated to {model}'s {max_length} tokens; dropped: {removed!r}",
                stacklevel=2,
            )
    return ids.astype(np.int32)


def tokenize_t5(
    tokenizer: T5TokenizerFast,
    prompts: str | Sequence[str],
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> np.ndarray:
    """Prompts -> (B, max_sequence_length) int32 ids for the T5 encoder, as FluxPipeline's
    `_get_t5_prompt_embeds` tokenizes them: the prompt's tokens, `</s>`, then `<pad>` up to
    max_sequence_length (Flux's, whatever the tokenizer's model_max_length; the encoder is
    then called without an attention mask). A longer prompt keeps its first
    max_sequence_length - 1 tokens and `</s>`, with a warning naming the text dropped."""
    return tokenize(tokenizer, prompts, max_sequence_length)


def write_tokenizer(
    folder: str | Path,
    words: Iterable[str],
    *,
    pad_token: str = "<|endoftext|>",
    model_max_length: int = 77,
) -> dict[str, int]:
    """Writes a small CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) that
    transformers' CLIPTokenizer loads, and returns its vocabulary.

    Every word of `words` (lower case) is one token; any other word made of lower-case
    letters and digits is spelled letter by letter. Ids: 0 start of text, 1 end of text,
    2 "!" (SDXL's second tokenizer pads with it: `pad_token="!"`), then letters, then words.
    Each word gets, after the merges of the words before it, the merges it still needs.
    """
    words = list(dict.fromkeys(words))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}
    for char in sorted(set(string.ascii_lowercase + string.digits + "".join(words))):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = _apply_merges([*word[:-1], word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"model_max_length": model_max_length, "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding: merge the adjacent pair of lowest rank until none is left."""
    while True:
        pairs = [p for p in itertools.pairwise(symbols) if p in merges]
        if not pairs:
            return symbols
        first, second = min(pairs, key=merges.index)
        i = next(i for i in range(len(symbols) - 1) if symbols[i : i + 2] == [first, second])
        symbols = [*symbols[:i], first + second, *symbols[i + 2 :]]
