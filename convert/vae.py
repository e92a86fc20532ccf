"""diffusers AutoencoderKL checkpoints: the key map of those saved before diffusers 0.14."""

from __future__ import annotations

import re

from convert.files import RenamedReader, TensorReader

# Checkpoints saved before diffusers 0.14 name the mid-block attention's layers as the old
# `AttentionBlock` did; diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def current_names(reader: TensorReader) -> RenamedReader:
    """The reader's tensors under their current diffusers names."""
    return RenamedReader(reader, {_current_name(key): key for key in reader.keys()})  # noqa: SIM118 (not a dict)


def _current_name(key: str) -> str:
    match = _LEGACY_ATTENTION.fullmatch(key)
    if match is None:
        return key
    path, layer, param = match.groups()
    return f"{path}.{_LEGACY_NAMES[layer]}.{param}"
