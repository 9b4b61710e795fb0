"""Pure numpy image preprocessing: reading files, converting to 8-bit, resizing.

Raw-plate normalisation (Anscombe, plate-wise DMSO z-score, tiling) also belongs here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellmorph.errors import CellmorphError

TIFF_SUFFIXES = {".tif", ".tiff"}


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as an H x W x C array (grey images get C = 1).

    Raises CellmorphError naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise CellmorphError(f"{path}: image file not found. Check the data folder and the table's image paths.")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise CellmorphError(
            f"{path}: cannot decode image ({type(err).__name__}: {err}). The file is corrupt or truncated; "
            "replace it (re-download or re-export) or remove its row from the table."
        ) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CellmorphError(f"{path}: expected a 2-D grey or H x W x C image, got shape {arr.shape}.")
    if arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[:, :, :3]
    return arr


def to_uint8(arr: np.ndarray, low_pct: float = 0.1, high_pct: float = 99.9) -> np.ndarray:
    """8-bit images pass through; others are stretched per channel between percentiles to 0-255."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    lo = np.percentile(a, low_pct, axis=(0, 1), keepdims=True)
    hi = np.percentile(a, high_pct, axis=(0, 1), keepdims=True)
    scaled = (a - lo) / np.maximum(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def resize_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize an H x W x C uint8 image to size x size (area-averaging when shrinking)."""
    if size <= 0 or arr.shape[:2] == (size, size):
        return arr
    resample = Image.Resampling.BOX if min(arr.shape[:2]) > size else Image.Resampling.BILINEAR
    chans = [np.asarray(Image.fromarray(arr[:, :, c]).resize((size, size), resample)) for c in range(arr.shape[2])]
    return np.stack(chans, axis=2)


def load_field(paths: list[str], size: int) -> np.ndarray:
    """Read the files of one field of view, stack their channels, return C x H x W uint8."""
    parts = [resize_uint8(to_uint8(read_image(p)), size) for p in paths]
    shapes = {p.shape[:2] for p in parts}
    if len(shapes) > 1:
        raise CellmorphError(f"channel files of one field have different sizes {sorted(shapes)}: {paths}")
    return np.ascontiguousarray(np.concatenate(parts, axis=2).transpose(2, 0, 1))


def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe variance-stabilising transform 2*sqrt(x + 3/8)."""
    return 2.0 * np.sqrt(np.asarray(x, dtype=np.float64) + 3.0 / 8.0)
