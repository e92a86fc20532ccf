"""Images in [0, 1] as float arrays: reading and writing them (atomically), comparing them."""

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxfusion.files import check_parent_folder, write_atomically

SUFFIXES = (".png", ".npy")


def check_output_path(path: str | Path) -> Path:
    """Refuses an output path whose suffix is not .png or .npy, or whose folder is missing,
    a file, or not writable."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {path}: the file must end in .png (image) or .npy (float32 array)")
    check_parent_folder(path, "--out")
    try:  # what the write will do, tried now: permissions, read-only or full file systems
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as error:
        raise PermissionError(
            f"--out {path}: cannot write in folder {path.parent} ({error.strerror}); "
            "name another folder"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def save_image(image: np.ndarray, path: str | Path) -> None:
    """(H, W, 3) float in [0, 1] -> `.png` (8-bit, rounded) or `.npy` (float32), written to a
    temporary file and renamed."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = np.asarray(image, np.float32)

        def write_array(tmp: str) -> None:
            with open(tmp, "wb") as file:  # np.save would append .npy to a bare name
                np.save(file, array)

        write_atomically(path, write_array)
        return
    from PIL import Image

    pixels = Image.fromarray(to_uint8(image))
    write_atomically(path, lambda tmp: pixels.save(tmp, format="PNG"))


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as (H, W, 3) float32 in [0, 1] (RGB; alpha dropped), resized to
    `size` = (height, width) with Lanczos filtering where it differs (as diffusers' image
    processor resizes a PIL image). Refuses a missing file or one PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not an image file PIL can read ({error})") from None
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return image_batch(image)[0]


def image_batch(image: Any) -> np.ndarray:
    """A PIL image, a list of them, or an array (H, W, 3) or (N, H, W, 3), float in [0, 1]
    or uint8 -> (N, H, W, 3) float32 in [0, 1]; anything else refused."""
    if isinstance(image, list | tuple):
        return np.concatenate([image_batch(part) for part in image])
    if hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"image has shape {array.shape}; expected (height, width, 3) or (batch, height, "
            "width, 3) RGB (NHWC, as jaxfusion's images), or a PIL image"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    array = array.astype(np.float32)
    if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError("image values must be finite and in [0, 1] (or uint8 in [0, 255])")
    return array


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10 log10(1 / MSE); inf if equal."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def side_by_side(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """(H, W, 3) images -> one (H, n*W + (n-1)*gap, 3) image, white between."""
    height = images[0].shape[0]
    spacer = np.ones((height, gap, 3), np.float32)
    parts = [part for image in images for part in (np.asarray(image, np.float32), spacer)]
    return np.concatenate(parts[:-1], axis=1)


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows of (H, W, 3) images (the same count in each) -> one image: each row
    `side_by_side`, the rows stacked with `gap` white pixels between.
    Size: (r*H + (r-1)*gap, n*W + (n-1)*gap, 3) for r rows of n images."""
    lines = [side_by_side(row, gap) for row in rows]
    spacer = np.ones((gap, lines[0].shape[1], 3), np.float32)
    parts = [part for line in lines for part in (line, spacer)]
    return np.concatenate(parts[:-1], axis=0)


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004) of (H, W, 3) images in [0, 1], by
    scikit-image with the paper's settings: an 11 x 11 Gaussian window of sigma 1.5, the
    population covariance, averaged over channels. 1 if equal."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            np.asarray(image, np.float64),
            np.asarray(reference, np.float64),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )
