"""transformers CLIP text encoder checkpoints (a pipeline's `text_encoder/` or
`text_encoder_2/`): their file names and key map."""

from __future__ import annotations

from convert.files import RenamedReader, TensorReader

WEIGHTS_NAME = "model"
# What transformers writes in a safetensors file's header, and reads back.
METADATA = {"format": "pt"}
PREFIX = "text_model."
# Buffers transformers saved beside the parameters in older checkpoints.
BUFFERS = ("position_ids",)


def text_model_keys(reader: TensorReader) -> RenamedReader:
    """The reader's parameters with every key under `text_model.` (transformers >= 5 writes
    a CLIPTextModel's keys without it), without the buffers older checkpoints saved."""
    keys = [key for key in reader.keys() if not key.endswith(BUFFERS)]  # noqa: SIM118 (not a dict)
    prefixed = any(key.startswith(PREFIX) for key in keys)
    return RenamedReader(reader, {key if prefixed else PREFIX + key: key for key in keys})
