"""How well a built-in-architecture pipeline folder draws what it is asked, judged by the
detector of tests/test_builtin_model.py (the oracle the shipped model's tests use): for each
size, the detector's accuracy on its 18 one-shape prompts, the share drawn as one dominant
shape, the share of its 12 two-shape prompts ("a red circle at the top left and a green
square at the top right") with both colours in their asked thirds, and which of seeds 0-3
draw the README's quick-start prompt as asked. With `--vocabulary-seeds N`, also the share
of the vocabulary's one-shape prompts (every colour and shape, plain, with a place, a size
word, a background, and all three: `judge.FORMS`) drawn as one shape of the asked colour
and kind at the asked place, per form, each form's 18 prompts on N seeds, and how many
failed each of the judge's checks (`judge.why_not_as_asked`); with
`--reconstruction-seeds N`, the same judge on the VAE's reconstructions of rendered scenes
of those prompts (what a perfect UNet could reach through that VAE). For a training run's
snapshots (`jaxfusion train --snapshots DIR`) before one is shipped.

    python benchmarks/builtin_accuracy.py [FOLDER ...] [--sizes 64 256] [--images DIR]
        [--first-seed N] [--vocabulary-seeds N] [--reconstruction-seeds N] [--no-pairs]

FOLDER defaults to the shipped model. `--images DIR` also writes the judged images of each
folder and size as DIR/NAME-SIZE.png, two rows of 11: the 18 prompts, then the quick-start
prompt from seeds 0-3; the two-shape prompts as DIR/NAME-SIZE-pairs.png, one row; and the
vocabulary's first seed as DIR/NAME-SIZE-vocabulary.png, a row per form.
`--first-seed N` draws prompt i from seed N + i instead of i (the quick start from N to
N + 3, the vocabulary from seeds N to N + N' - 1): seeds the tests never see, to compare
snapshots without choosing one on the tests' own images.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

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
    parser.add_argument(
        "--vocabulary-seeds",
        type=int,
        default=0,
        metavar="N",
        help="judge the vocabulary on N seeds",
    )
    parser.add_argument(
        "--reconstruction-seeds",
        type=int,
        default=0,
        metavar="N",
        help="judge the VAE's reconstructions of the vocabulary's scenes on N seeds",
    )
    parser.add_argument(
        "--no-pairs",
        action="store_true",
        help="only the vocabulary: skip the 18 prompts, the two-shape prompts and the quick start",
    )
    args = parser.parse_args()
    seed = args.first_seed
    pair_prompts = [judge.pair_prompt(pair) for pair in judge.PAIRS]
    for folder in args.folders:
        pipe = jaxfusion.load_pipeline(folder)
        for size in args.sizes:
            name = f"{Path(folder).name}-{size}"
            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
            if args.vocabulary_seeds:
                vocabulary(pipe, folder, size, range(seed, seed + args.vocabulary_seeds),
                           args.images and args.images / f"{name}-vocabulary.png")  # fmt: skip
            if args.reconstruction_seeds:
                reconstructions(pipe, folder, size, range(seed, seed + args.reconstruction_seeds))
            if args.no_pairs:
                continue
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
                judged = [*images, *drawn]
                rows = [judged[: len(judged) // 2], judged[len(judged) // 2 :]]
                save_image(grid(rows), args.images / f"{name}.png")
                save_image(grid([list(pairs)]), args.images / f"{name}-pairs.png")


def vocabulary(pipe, folder: str, size: int, seeds: range, image_file: Path | None) -> None:
    """Prints the share of each form's prompts drawn as asked on `seeds`, and of all; writes
    the first seed's images to `image_file`, a row per form."""
    judged: dict[str, list[str | None]] = {form: [] for form in judge.FORMS}
    for seed in seeds:
        cases, images = judge.draw_vocabulary(pipe, size, seed)
        tally(judged, cases, images)
        if image_file and seed == seeds[0]:
            save_image(
                grid([list(images[k : k + 18]) for k in range(0, len(images), 18)]), image_file
            )
    report(f"{folder} at {size}x{size}, one-shape prompts drawn as asked", seeds, judged)


def reconstructions(pipe, folder: str, size: int, seeds: range) -> None:
    """Prints the share of the vocabulary's scenes, rendered as the training data draws them
    (a place and background drawn where the prompt names none, the centre jittered), that
    the judge passes after the VAE's encoder (latent means) and decoder."""
    import jax

    from jaxfusion.train import shapes

    vae = pipe.models.vae
    autoencode = jax.jit(lambda x: vae.decode(vae.encode(x).mean))
    judged: dict[str, list[str | None]] = {form: [] for form in judge.FORMS}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        cases = [case for form in judge.FORMS for case in judge.one_shape_cases(form, seed)]
        scenes = []
        for case in cases:
            place = case.place or str(rng.choice(list(shapes.PLACES)))
            spec = shapes.ShapeSpec(case.colour, case.shape, place, case.size)
            background = case.background or str(rng.choice(list(shapes.BACKGROUNDS)))
            offset = rng.uniform(-shapes.JITTER, shapes.JITTER, (1, 2))
            scenes.append(shapes.render([spec], background, size, offset))
        images = np.clip((np.asarray(autoencode(np.stack(scenes) * 2 - 1)) + 1) / 2, 0, 1)
        tally(judged, cases, images)
    report(f"{folder} at {size}x{size}, VAE reconstructions judged as asked", seeds, judged)


def tally(judged: dict[str, list[str | None]], cases: list, images) -> None:
    """Appends to judged[form] what `judge.why_not_as_asked` finds for each image of a seed's
    vocabulary (its cases in the order of judge.FORMS, 18 a form), with the size word the
    prompt names ("drawn as circle (small)"): None where drawn as asked."""
    per_form = len(cases) // len(judge.FORMS)
    for k, (case, image) in enumerate(zip(cases, images, strict=True)):
        why = judge.why_not_as_asked(image, case)
        if why is not None and case.size:
            why = f"{why} ({case.size})"
        judged[judge.FORMS[k // per_form]].append(why)


def report(what: str, seeds: range, judged: dict[str, list[str | None]]) -> None:
    """Prints `what` with the share of all judged images passed and of each form's, then per
    form how many failed each check."""
    shares = ", ".join(
        f"{form} {np.mean([why is None for why in whys]):.1%}" for form, whys in judged.items()
    )
    every = [why is None for whys in judged.values() for why in whys]
    print(
        f"{what} on seeds {seeds[0]}-{seeds[-1]}: {np.mean(every):.1%} of {len(every)} ({shares})",
        flush=True,
    )
    for form, whys in judged.items():
        failures = Counter(why for why in whys if why is not None)
        listed = ", ".join(f"{count} {why}" for why, count in failures.most_common())
        if listed:
            print(f"  {form} failed: {listed}")


if __name__ == "__main__":
    main()
