"""The picture at the top of the README and the docs: one prompt on the built-in model
drawn on one device (`single`), and split into row slabs over several devices, DistriFusion's
way (`displaced`: neighbours' context from the step before) and with no exchange at all
(`naive`), each with its PSNR against `single` and its difference from it.

    python docs/scripts/modes_figure.py            # writes docs/images/modes.png

Every image comes from the same initial noise (the seed); the devices are simulated CPU
devices where there is no accelerator, which changes the numbers only by float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

OUT = Path(__file__).parents[1] / "images" / "modes.png"
PROMPT = "a red circle at the top left and a blue square at the bottom right"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)  # CPU only; before JAX starts
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import jaxfusion
    from jaxfusion.images import psnr

    pipe = jaxfusion.load_pipeline()  # the built-in model
    request = dict(
        height=args.size, width=args.size, num_inference_steps=args.steps, seed=args.seed
    )
    modes = {
        "single": None,
        "displaced": jaxfusion.ParallelConfig(devices=args.devices, mode="displaced"),
        "naive": jaxfusion.ParallelConfig(devices=args.devices, mode="naive"),
    }
    images = {name: pipe(args.prompt, parallel=p, **request)[0] for name, p in modes.items()}
    scores = {name: psnr(image, images["single"]) for name, image in images.items()}

    figure, axes = plt.subplots(2, 3, figsize=(9, 7.0))
    for column, (name, image) in enumerate(images.items()):
        devices = 1 if name == "single" else args.devices
        score = "" if name == "single" else f", {scores[name]:.1f} dB"
        axes[0, column].imshow(image)
        axes[0, column].set_title(f"{name}, {devices} device{'s' * (devices > 1)}{score}")
        difference = np.clip(np.abs(image - images["single"]) * 4, 0, 1)
        axes[1, column].imshow(difference)
        axes[1, column].set_title(f"|{name} - single| x 4", fontsize=9)
        if name != "single":  # the slab boundaries
            for row in range(1, devices):
                for ax in axes[:, column]:
                    ax.axhline(row * args.size / devices - 0.5, color="0.6", lw=0.6, ls=":")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(
        f'built-in model, "{args.prompt}", {args.size}x{args.size}, {args.steps} steps, '
        f"seed {args.seed}",
        fontsize=9,
    )
    figure.tight_layout(h_pad=1.5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({**settings, "psnr_db_against_single": scores}))


if __name__ == "__main__":
    main()
