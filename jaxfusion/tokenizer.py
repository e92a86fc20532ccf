"""The CLIP tokenizers of a pipeline folder (transformers' `CLIPTokenizer`, read offline) and
prompts -> the (B, 77) token ids the text encoders take, as diffusers' `encode_prompt`
tokenizes them."""

from __future__ import annotations

import itertools
import json
import logging
import string
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# transformers' model_max_length when tokenizer_config.json does not set one.
_UNSET_MAX_LENGTH = 10**6


def load_tokenizer(path: str | Path, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """transformers' CLIPTokenizer from local files only (nothing is downloaded).

    Args:
      path: a diffusers pipeline folder (its `subfolder` is used) or a tokenizer folder
        (`vocab.json` + `merges.txt`, or `tokenizer.json`; `tokenizer_config.json`).
      subfolder: "tokenizer" (SD, SDXL's first encoder) or "tokenizer_2" (SDXL's second,
        which pads with "!" instead of "<|endoftext|>").
    """
    try:
        CLIPTokenizer = import_clip_tokenizer()
    except ImportError as error:
        raise ImportError(
            "tokenizing prompts needs the transformers package: pip install transformers"
        ) from error
    folder = Path(path)
    if not _has_vocabulary(folder):
        folder = folder / subfolder
    if not _has_vocabulary(folder):
        raise FileNotFoundError(
            f"{path} is neither a tokenizer folder (vocab.json or tokenizer.json) nor a "
            f"pipeline folder with a {subfolder}/ subfolder holding one"
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length >= _UNSET_MAX_LENGTH:
        raise ValueError(
            f"{folder} sets no model_max_length (tokenizer_config.json); SD tokenizers have 77"
        )
    return tokenizer


class _NoModelsNotice(logging.Filter):
    """Drops transformers' notice, when it is imported without PyTorch, that its models
    will not be available ("PyTorch was not found. Models won't be available ..."):
    jaxfusion uses its tokenizers only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Models won't be available" not in record.getMessage()


def import_clip_tokenizer() -> type[CLIPTokenizer]:
    """transformers' `CLIPTokenizer`, imported as quietly as the command imports it: a
    filter on transformers' logger drops its no-PyTorch notice during the import alone,
    and nothing else of the user's logging or environment changes."""
    logger = logging.getLogger("transformers")
    quiet = _NoModelsNotice()
    logger.addFilter(quiet)
    try:
        from transformers import CLIPTokenizer
    finally:
        logger.removeFilter(quiet)
    return CLIPTokenizer


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Writes the tokenizer as transformers does, plus `vocab.json` and `merges.txt`, which
    transformers 5 no longer writes and earlier versions need."""
    tokenizer.save_pretrained(folder)
    if not (Path(folder) / "vocab.json").is_file():
        tokenizer.backend_tokenizer.model.save(str(folder))


def _has_vocabulary(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def tokenize(
    tokenizer: CLIPTokenizer, prompts: str | Sequence[str], max_length: int | None = None
) -> np.ndarray:
    """Prompts -> (B, max_length) int32 token ids: start token, the prompt, end token, then
    the tokenizer's pad token up to `max_length` (default: the tokenizer's model_max_length,
    77). A longer prompt is cut to fit, with a warning naming the text that was dropped (as
    diffusers warns)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = tokenizer.model_max_length if max_length is None else max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    ).input_ids
    for prompt_ids in tokenizer(prompts, verbose=False).input_ids:
        if len(prompt_ids) > max_length:
            removed = tokenizer.decode(prompt_ids[max_length - 1 : -1])
            warnings.warn(
                f"prompt truncated to CLIP's {max_length} tokens; dropped: {removed!r}",
                stacklevel=2,
            )
    return ids.astype(np.int32)


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
