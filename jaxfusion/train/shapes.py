"""The training data of the built-in model, made by code: one to three coloured shapes
(circles, squares, triangles) on a plain background, each at one of nine places, with a
caption that says so, e.g. "a red circle at the top left and a big blue square on the right
on a black background". Deterministic: a batch is a function of (seed, index)."""

from typing import NamedTuple

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Place phrase -> centre as (row, column) fractions of the image.
PLACES = {
    "at the top left": (0.22, 0.22),
    "at the top": (0.22, 0.5),
    "at the top right": (0.22, 0.78),
    "on the left": (0.5, 0.22),
    "in the center": (0.5, 0.5),
    "on the right": (0.5, 0.78),
    "at the bottom left": (0.78, 0.22),
    "at the bottom": (0.78, 0.5),
    "at the bottom right": (0.78, 0.78),
}
# Size word -> half-width of the shape as a fraction of the image ("" is the usual size).
SIZES = {"small": 0.09, "": 0.13, "big": 0.18}
JITTER = 0.03  # random shift of a shape's centre, fraction of the image
PLACE_WORDS = {word for place in PLACES for word in place.split()}
WORDS = sorted({"a", "an", "and", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *PLACE_WORDS})
WORDS += [size for size in SIZES if size]


class ShapeSpec(NamedTuple):
    colour: str
    shape: str
    place: str
    size: str = ""
    place_named: bool = True  # whether its phrase says where it is

    def phrase(self) -> str:
        """ "a big red circle at the top left", "an orange square in the center", and with
        the place unnamed "a big red circle"."""
        description = " ".join(word for word in (self.size, self.colour, self.shape) if word)
        article = "an" if description[0] in "aeiou" else "a"
        words = f"{article} {description}"
        return f"{words} {self.place}" if self.place_named else words


def caption(objects: list[ShapeSpec], background: str | None) -> str:
    """ "a red circle at the top left and a blue square at the bottom[ on a gray background]"."""
    text = " and ".join(spec.phrase() for spec in objects)
    return f"{text} on a {background} background" if background else text


def render(objects: list[ShapeSpec], background: str, size: int, offsets=None) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: the objects drawn in order on the background.
    `offsets`: per object a (row, column) shift of its centre, fractions of the image."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.asarray(BACKGROUNDS[background], np.float32) / 255
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for i, spec in enumerate(objects):
        dy, dx = (0.0, 0.0) if offsets is None else offsets[i]
        centre_row, centre_col = PLACES[spec.place]
        y = (rows / size - centre_row - dy) / SIZES[spec.size]
        x = (cols / size - centre_col - dx) / SIZES[spec.size]
        if spec.shape == "circle":
            mask = x**2 + y**2 <= 1
        elif spec.shape == "square":
            mask = (np.abs(x) <= 0.85) & (np.abs(y) <= 0.85)
        else:  # apex up, base at y = 0.8
            mask = (y <= 0.8) & (y >= -1.0) & (np.abs(x) <= (y + 1.0) / 1.8)
        image[mask] = np.asarray(COLOURS[spec.colour], np.float32) / 255
    return image


def random_scene(
    rng: np.random.Generator, object_counts: tuple[float, ...] | None, unplaced: float = 0.0
) -> tuple[list[ShapeSpec], str, bool]:
    """(objects at distinct places, background, whether the caption names the background).
    The scene holds n objects with probability object_counts[n - 1]; without them, one
    object half the time, else two or three (the draws of the built-in model's first run).
    The caption leaves every place out with probability `unplaced` (at 0, the stream draws
    nothing for it: the scenes of the runs before it existed)."""
    if object_counts is None:
        count = 1 if rng.random() < 0.5 else int(rng.integers(2, 4))
    else:
        count = int(rng.choice(np.arange(1, len(object_counts) + 1), p=object_counts))
    places = rng.choice(list(PLACES), size=count, replace=False)
    objects = [
        ShapeSpec(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            place=str(place),
            size=str(rng.choice(list(SIZES), p=[0.3, 0.4, 0.3])),
        )
        for place in places
    ]
    background, named = str(rng.choice(list(BACKGROUNDS))), bool(rng.random() < 0.5)
    if unplaced > 0 and rng.random() < unplaced:
        objects = [spec._replace(place_named=False) for spec in objects]
    return objects, background, named


def batch(
    seed: int,
    index: int,
    batch_size: int,
    size: int,
    object_counts: tuple[float, ...] | None = None,
    unplaced: float = 0.0,
) -> tuple[np.ndarray, list[str]]:
    """Batch `index` of the stream `seed`: (images (B, size, size, 3) float32 in [-1, 1]
    NHWC, B captions), scenes drawn by `random_scene(rng, object_counts, unplaced)`."""
    rng = np.random.default_rng([seed, index])
    images, captions = [], []
    for _ in range(batch_size):
        objects, background, named = random_scene(rng, object_counts, unplaced)
        offsets = rng.uniform(-JITTER, JITTER, size=(len(objects), 2))
        images.append(render(objects, background, size, offsets))
        captions.append(caption(objects, background if named else None))
    return np.stack(images) * 2 - 1, captions
