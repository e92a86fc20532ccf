"""A package's public names imported on first use (PEP 562), so that importing the package
(for the command line's `--help`, or a JAX-free submodule) does not import JAX. Used by
`sharding` and the `jaxfusion` packages; it imports nothing but the standard library."""

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    package: str, attributes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of `package` (call it from the package's
    `__init__`): each name of `attributes` is imported from the module it maps to on first
    use, and so is any other name that is a submodule of `package`."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in attributes:
            value = getattr(importlib.import_module(attributes[name]), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *attributes})

    return __getattr__, __dir__
