"""Images in [0, 1] as float arrays: writing them (atomically) and comparing them."""

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxfusion.files import write_atomically

SUFFIXES = (".png", ".npy")


def check_output_path(path: str | Path) -> Path:
    """Refuses an output path whose suffix is not .png or .npy, or whose folder is missing or
    not writable."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {path}: the file must end in .png (image) or .npy (float32 array)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {path}: folder {path.parent} does not exist")
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
