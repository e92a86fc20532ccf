"""Reading a diffusers `config.json` into a frozen dataclass, refusing what it cannot model."""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")

# Bookkeeping keys that diffusers writes into every config.json.
BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})


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
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = []
    if config.get("_class_name", class_name) != class_name:
        problems.append(f"_class_name: {config['_class_name']!r} is not a {class_name}")
    for key, value in config.items():
        if key in fields or key in ignored_keys or key in BOOKKEEPING_KEYS:
            continue
        if key not in fixed_keys:
            problems.append(f"{key}: unknown key")
        elif value != fixed_keys[key]:
            problems.append(f"{key}: {value!r} is not supported (only {fixed_keys[key]!r})")
    if problems:
        raise ValueError(f"unsupported {class_name} configuration:\n  " + "\n  ".join(problems))
    return cls(**{k: v for k, v in config.items() if k in fields})
