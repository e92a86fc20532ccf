"""The machine a benchmark ran on, for its JSON: platform, processor, Python, jax and its
backend."""

import platform

import jax
import psutil


def machine() -> dict:
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=psutil.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        device=str(jax.devices()[0]),
    )
