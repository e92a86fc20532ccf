"""JAX's persistent compilation cache, so that a second run of the same program loads the
compiled executable from disk instead of compiling again."""

from pathlib import Path

import jax

from jaxfusion.builtin import cache_dir

HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CacheHits:
    """Counts programs loaded from the persistent cache (JAX's monitoring events)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == HIT_EVENT:
            self.count += 1


def enable_compilation_cache(directory: str | Path | None = None) -> CacheHits:
    """Turns on JAX's persistent compilation cache in `directory` (default: `xla/` in
    jaxfusion's cache folder, see `jaxfusion.builtin.cache_dir`) for every program, however
    quick to compile, and returns a counter of the programs it serves."""
    directory = Path(directory) if directory is not None else cache_dir() / "xla"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return CacheHits()
