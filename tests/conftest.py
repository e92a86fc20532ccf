"""Eight simulated CPU devices for the patch-parallel tests (set before JAX starts its
backends); single-device tests use the first."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
