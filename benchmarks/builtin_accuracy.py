"""How well a built-in-architecture pipeline folder draws what it is asked, judged by the
detector of tests/test_builtin_model.py (the oracle the shipped model's tests use): for each
size, the detector's accuracy on its 18 one-shape prompts, the share drawn as one dominant
shape, the share of its 12 two-shape prompts ("a red circle at the top left and a green
square at the top right") with both colours in their asked thirds, and which of seeds 0-3
draw the README's quick-start prompt as asked. For a training run's snapshots (`jaxfusion
train --snapshots DIR`) before one is shipped.

    python benchmarks/builtin_accuracy.py [FOLDER ...] [--sizes 64 256] [--images DIR]
        [--first-seed N]

FOLDER defaults to the shipped model. `--images DIR` also writes the judged images of each
folder and size as DIR/NAME-SIZE.png, two rows of 11: the 18 prompts, then the quick-start
prompt from seeds 0-3; and the two-shape prompts as DIR/NAME-SIZE-pairs.png, one row.
`--first-seed N` draws prompt i from seed N + i instead of i (the quick start from N to
N + 3): seeds the tests never see, to compare snapshots without choosing one on the tests'
own images.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_builtin_model as judge

import jaxfusion
from jaxfusion.images import grid, save_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["builtin"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--images", type=Path, help="write the judged images to this folder")
    parser.add_argument("--first-seed", type=int, default=0, help="draw prompt i from seed N + i")
    args = parser.parse_args()
    seed = args.first_seed
    pair_prompts = [judge.pair_prompt(pair) for pair in judge.PAIRS]
    for folder in args.folders:
        pipe = jaxfusion.load_pipeline(folder)
        for size in args.sizes:
            images = judge.generate(pipe, size, seed)
            drawn = judge.quick_start(pipe, size, seed)
            quick_start = [judge.quick_start_ok(image) for image in drawn]
            pairs = judge.draw(pipe, pair_prompts, size, seed)
            print(
                f"{folder} at {size}x{size}: detector accuracy {judge.accuracy(images):.0%}, "
                f"one dominant shape {judge.one_shape_share(images):.0%}, "
                f"two shapes placed as asked {judge.pairs_placed_share(pairs):.0%} "
                f"of {len(pairs)}, "
                f"quick-start prompt drawn as asked for seeds {seed}-{seed + 3}: {quick_start}",
                flush=True,
            )
            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
                judged = [*images, *drawn]
                rows = [judged[: len(judged) // 2], judged[len(judged) // 2 :]]
                name = f"{Path(folder).name}-{size}"
                save_image(grid(rows), args.images / f"{name}.png")
                save_image(grid([list(pairs)]), args.images / f"{name}-pairs.png")


if __name__ == "__main__":
    main()
