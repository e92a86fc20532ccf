"""transformers text encoder checkpoints (a pipeline's `text_encoder/` or `text_encoder_2/`):
CLIP's (SD, SDXL) and T5's (Flux), their file names and key maps."""

from __future__ import annotations

from convert.files import RenamedReader, TensorReader

WEIGHTS_NAME = "model"
# What transformers writes in a safetensors file's header, and reads back.
METADATA = {"format": "pt"}
PREFIX = "text_model."
# Buffers transformers saved beside the parameters in older checkpoints.
BUFFERS = ("position_ids",)
# T5's token embedding, and the key transformers ties to it (the encoder's own reference).
T5_EMBEDDING = "shared.weight"
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def text_model_keys(reader: TensorReader) -> RenamedReader:
    """The reader's parameters with every key under `text_model.` (transformers >= 5 writes
    a CLIPTextModel's keys without it), without the buffers older checkpoints saved."""
    keys = [key for key in reader.keys() if not key.endswith(BUFFERS)]  # noqa: SIM118 (not a dict)
    prefixed = any(key.startswith(PREFIX) for key in keys)
    return RenamedReader(reader, {key if prefixed else PREFIX + key: key for key in keys})


def t5_encoder_keys(reader: TensorReader) -> RenamedReader:
    """The reader's parameters with the token embedding as `shared.weight` alone.

    transformers ties `encoder.embed_tokens.weight` to `shared.weight`: its `save_pretrained`
    writes one of them (`shared.weight` in 5.x), other writers may write both (the same
    tensor) or only the encoder's. Where both are there `shared.weight` is read, as
    transformers does.
    """
    keys = list(reader.keys())
    names = {key: key for key in keys if key != T5_TIED_EMBEDDING}
    if T5_TIED_EMBEDDING in keys and T5_EMBEDDING not in keys:
        names[T5_EMBEDDING] = T5_TIED_EMBEDDING
    return RenamedReader(reader, names)
