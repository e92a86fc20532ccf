"""XLA compile time of one generation of the tests' random SDXL pipelines, per kind and layout:
what each test that runs it pays before its first step (3 steps, 32x32, 8 simulated CPU
devices as in tests/conftest.py; no compilation cache).

    python benchmarks/random_pipeline_compile.py [--kinds sdxl sdxl-light]

Prints, for one device, sync on 4 and displaced on 4: the wall time of the call, the number
of XLA compilations and their summed duration (JAX's backend-compile event). The small
helper programs (text encoders, VAE) compile for the first kind only: later kinds reuse them."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
jax.config.update("jax_num_cpu_devices", 8)

from pipelines import count_compiles, save_random_pipeline  # noqa: E402

import jaxfusion  # noqa: E402
from sharding.parallel import ParallelConfig  # noqa: E402

LAYOUTS = {
    "single": None,
    "sync on 4": ParallelConfig(4, mode="sync"),
    "displaced on 4": ParallelConfig(4, warmup_steps=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["sdxl", "sdxl-light"])
    for kind in parser.parse_args().kinds:
        with tempfile.TemporaryDirectory() as folder:
            pipe = jaxfusion.load_pipeline(save_random_pipeline(Path(folder) / kind, kind))
        for name, parallel in LAYOUTS.items():
            start = time.perf_counter()
            with count_compiles() as compiles:
                pipe(prompt="a red circle", num_inference_steps=3, seed=0, parallel=parallel)
            print(
                f"{kind:>10} {name:>14}: {time.perf_counter() - start:5.1f} s, "
                f"{len(compiles)} compilations, {sum(compiles):5.1f} s compiling",
                flush=True,
            )


if __name__ == "__main__":
    main()
