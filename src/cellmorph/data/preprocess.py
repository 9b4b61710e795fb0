"""Pure numpy image preprocessing: reading files, converting to 8-bit, resizing.

Raw-plate normalisation (Anscombe, plate-wise DMSO z-score, tiling) also belongs here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from cellmorph.data.omezarr import is_zarr_ref, read_zarr_plane, zarr_ref_dtype, zarr_ref_shape
from cellmorph.errors import CellmorphError

TIFF_SUFFIXES = {".tif", ".tiff"}
# The most pixels (height x width, all planes of a stack; channels not counted) cellmorph decodes from one file:
# a 1 MB zlib file can hold 16000 x 16000 x 3 zeros (768 MB). Real fields are far smaller (BBBC021: 1280 x 1024,
# Cell Painting: 2160 x 2160). The one limit of every reader, checked from the header; CELLMORPH_MAX_PIXELS sets it.
MAX_PIXELS = 100_000_000
_PILLOW_OPEN = threading.Lock()


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as an H x W x C array (grey images get C = 1); an OME-Zarr image reference
    (`PLATE.zarr/ROW/COL/FIELD#c=N`, cellmorph.data.omezarr) reads that field's channel as H x W x 1.

    Raises CellmorphError naming the file when it is missing, truncated, corrupt, compressed with a codec
    that is not installed, holds NaN/infinite pixels (which would otherwise become a blank image), or its
    header declares more pixels than `max_pixels()` (checked before anything is decoded).
    """
    if is_zarr_ref(path):
        height, width = zarr_ref_shape(str(path))
        _check_pixels(path, height * width)
        return read_zarr_plane(str(path))
    path = Path(path)
    if not path.is_file():
        raise CellmorphError(f"{path}: image file not found. Check the data folder and the table's image paths.")
    try:
        arr = _decode(path)
    except CellmorphError:
        raise
    except Exception as err:  # zlib, imagecodecs, tifffile and Pillow each raise their own types on bad bytes
        if "imagecodecs" in str(err):
            raise CellmorphError(
                f"{path}: its compression needs the imagecodecs package ({err}). Install imagecodecs (pip install imagecodecs)."
            ) from None
        raise CellmorphError(
            f"{path}: cannot decode image ({type(err).__name__}: {err}). The file is corrupt or truncated; "
            "re-export or re-download it, or remove its row from the table."
        ) from None
    if arr.size == 0:
        raise CellmorphError(f"{path}: cannot decode image (no pixels). The file is corrupt or truncated; re-export or re-download it.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise CellmorphError(
            f"{path}: {bad} of {arr.size} pixels are NaN or infinite. Re-export the image with finite values "
            "(e.g. replace NaN/inf by 0) or remove its row from the table."
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CellmorphError(f"{path}: expected a 2-D grey or H x W x C image, got shape {arr.shape}.")
    if arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[:, :, :3]
    return arr


def max_pixels() -> int:
    """The pixel limit of one image file: CELLMORPH_MAX_PIXELS, or MAX_PIXELS."""
    raw = os.environ.get("CELLMORPH_MAX_PIXELS", "").strip()
    if not raw:
        return MAX_PIXELS
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise CellmorphError(f"CELLMORPH_MAX_PIXELS={raw!r}: expected a whole number of pixels, e.g. CELLMORPH_MAX_PIXELS=400000000 "
                             f"(unset: {MAX_PIXELS:,}).")
    return value


def _check_pixels(path: Path | str, pixels: int) -> None:
    limit = max_pixels()
    if pixels > limit:
        raise CellmorphError(
            f"{path}: {pixels:,} pixels, over cellmorph's limit of {limit:,} (a decompression bomb, or a very large image); "
            f"if the image is real, raise the limit: CELLMORPH_MAX_PIXELS={pixels}"
        )


def _decode(path: Path) -> np.ndarray:
    """The file's pixels, once its header's size has passed `_check_pixels`."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:  # what tifffile.imread reads: the first series
            series = tif.series[0]
            planes = series.shape[series.axes.index("S")] if "S" in series.axes else 1
            _check_pixels(path, int(np.prod(series.shape, dtype=np.int64)) // planes)
            return tif.asarray()
    with _PILLOW_OPEN:  # cellmorph's limit decides, not Pillow's (which calls a refused image "corrupt", or only warns)
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)  # the header only
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    with im:
        _check_pixels(path, im.size[0] * im.size[1])
        im.load()
        return np.asarray(im)


def image_dtype(path: str | Path) -> str:
    """The pixel type of an image file ("uint8", "uint16", ...), from its header only (nothing decoded); of an
    OME-Zarr image reference, from its array's metadata."""
    if is_zarr_ref(path):
        return zarr_ref_dtype(str(path))
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return str(tif.pages[0].dtype)
        with Image.open(path) as im:
            mode = im.mode
    except Exception as err:  # noqa: BLE001 - read_image gives the full message when the file is decoded
        raise CellmorphError(f"{path}: cannot read the image header ({type(err).__name__}: {err}). The file is corrupt or truncated.") from None
    return "uint16" if mode.startswith("I;16") else {"I": "int32", "F": "float32"}.get(mode, "uint8")


def intensity_mapping(dtype: str) -> str:
    """How `to_uint8` maps images of this pixel type to 0-255: what a model trained on them expects."""
    if dtype == "uint8":
        return "8-bit pixels used as they are"
    return "per image and channel, the 0.1-99.9 percentile range stretched to 0-255"


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
        raise CellmorphError(
            f"{', '.join(paths)}: the files of one row have different sizes {sorted(shapes)}. "
            "Set dataset.image_size in the config to resize every image to one size."
        )
    return np.ascontiguousarray(np.concatenate(parts, axis=2).transpose(2, 0, 1))


def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe variance-stabilising transform 2*sqrt(x + 3/8)."""
    return 2.0 * np.sqrt(np.asarray(x, dtype=np.float64) + 3.0 / 8.0)


# --- Raw plates (Kensert et al. 2019's preprocessing of BBBC021, BBBC013, BBBC014) -------------------------
#
# A raw field is C x H x W unsigned integers. Per plate and channel the Anscombe-transformed pixels of
# every DMSO field give a mean and a standard deviation; each field is z-scored with them, mapped to
# 0-255 by its own minimum and maximum (over all channels together), truncated to uint8, and tiled.
#
# Because raw pixels are integers, everything is done with lookup tables over the possible values:
# the DMSO statistics come from exact integer histograms (streaming: one histogram per channel per
# plate, whatever the number of fields), and a field's 8-bit image is one table lookup per pixel.
# The per-pixel result equals the direct formula evaluated in float64 (tests/test_preprocess_raw.py).

EMPTY_LEVEL = 255 / 5.1  # a crop is "near-empty" when at most 0.2% of its values exceed this (the paper's rule)
EMPTY_FRACTION = 0.002


def anscombe_table(levels: int) -> np.ndarray:
    """2*sqrt(x + 3/8) for every integer x in 0..levels-1 (float64)."""
    return anscombe(np.arange(levels))


def pixel_histogram(channel: np.ndarray, levels: int) -> np.ndarray:
    """Exact counts of each integer value 0..levels-1 in one channel (int64)."""
    return np.bincount(channel.ravel(), minlength=levels)[:levels].astype(np.int64)


def anscombe_stats(hist: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of the Anscombe-transformed pixels counted in `hist`."""
    n = hist.sum()
    if n == 0:
        raise ValueError("empty histogram")
    a = anscombe_table(len(hist))
    mean = float((hist * a).sum() / n)
    var = float((hist * (a - mean) ** 2).sum() / n)
    return mean, float(np.sqrt(var))


def zscore_tables(means, stds, levels: int) -> np.ndarray:
    """C x levels table: (anscombe(x) - mean_c) / std_c for every integer value x."""
    a = anscombe_table(levels)
    return np.stack([(a - m) / s for m, s in zip(means, stds)])


def scaled_tables(field: np.ndarray, ztab: np.ndarray) -> np.ndarray:
    """C x levels table of the field's 0-255 float values: (z - min) * 255 / (max - min), min/max over the field.

    z is non-decreasing in the raw value, so the field's z minimum and maximum sit at its raw extremes.
    A constant field (max == min) maps to 0.
    """
    c = field.shape[0]
    flat = field.reshape(c, -1)
    lo = min(ztab[i, flat[i].min()] for i in range(c))
    hi = max(ztab[i, flat[i].max()] for i in range(c))
    if hi <= lo:
        return np.zeros_like(ztab)
    return (ztab - lo) * 255.0 / (hi - lo)


def apply_tables(field: np.ndarray, scaled: np.ndarray) -> np.ndarray:
    """The field's uint8 image: each raw value looked up in its channel's scaled table, truncated as astype does."""
    u8 = np.clip(scaled, 0, 255).astype(np.uint8)  # truncation toward zero, like the paper's astype('uint8')
    return np.stack([np.take(u8[i], field[i]) for i in range(field.shape[0])])


def tile_boxes(height: int, width: int, grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of a rows x cols grid of equal crops, row by row (crop 1 = top-left)."""
    rows, cols = grid
    h, w = height // rows, width // cols
    return [(r * h, c * w, h, w) for r in range(rows) for c in range(cols)]


def near_empty(field: np.ndarray, scaled: np.ndarray, box, level: float = EMPTY_LEVEL, fraction: float = EMPTY_FRACTION) -> bool:
    """The paper's rule on one crop: at most `fraction` of its values (all channels) above `level` on the 0-255 scale.

    Evaluated on the float values before truncation, as the paper does: value > level  <=>  raw >= first raw
    value whose scaled value exceeds level (the tables are non-decreasing).
    """
    top, left, h, w = box
    above = 0
    for i in range(field.shape[0]):
        first = int(np.searchsorted(scaled[i], level, side="right"))
        above += int(np.count_nonzero(field[i, top : top + h, left : left + w] >= first))
    return above / (field.shape[0] * h * w) <= fraction


def normalize_field(field: np.ndarray, ztab: np.ndarray, grid: tuple[int, int] = (2, 2)) -> tuple[list[np.ndarray], list[bool]]:
    """One raw field (C x H x W unsigned ints) -> its uint8 crops and, per crop, whether it is kept (not near-empty)."""
    scaled = scaled_tables(field, ztab)
    img = apply_tables(field, scaled)
    crops, kept = [], []
    for box in tile_boxes(field.shape[1], field.shape[2], grid):
        top, left, h, w = box
        crops.append(img[:, top : top + h, left : left + w])
        kept.append(not near_empty(field, scaled, box))
    return crops, kept
