"""The CLIP tokenizers of a pipeline folder (transformers' `CLIPTokenizer`, read offline) and
prompts -> the (B, 77) token ids the text encoders take, as diffusers' `encode_prompt`
tokenizes them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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
        (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`).
      subfolder: "tokenizer" (SD, SDXL's first encoder) or "tokenizer_2" (SDXL's second,
        which pads with "!" instead of "<|endoftext|>").
    """
    try:
        from transformers import CLIPTokenizer
    except ImportError as error:
        raise ImportError(
            "tokenizing prompts needs the transformers package: pip install transformers"
        ) from error
    folder = Path(path)
    if not (folder / "vocab.json").is_file():
        folder = folder / subfolder
    if not (folder / "vocab.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a tokenizer folder (vocab.json) nor a pipeline folder with a "
            f"{subfolder}/ subfolder holding one"
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length >= _UNSET_MAX_LENGTH:
        raise ValueError(
            f"{folder} sets no model_max_length (tokenizer_config.json); SD tokenizers have 77"
        )
    return tokenizer


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
                "The following part of your input was truncated because CLIP can only handle "
                f"sequences up to {max_length} tokens: {removed!r}",
                stacklevel=2,
            )
    return ids.astype(np.int32)
