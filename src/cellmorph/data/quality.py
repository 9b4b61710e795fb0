"""Image quality control: cheap per-image numbers from the pixels a model sees, computed batch by batch in the
streaming path (never on all images at once), and the flags a screener expects from them.

Per image (uint8 C x H x W, as the store and `stream.field_batches` give them):

    qc_std         standard deviation of all its pixel values (0-255): a blank field has almost none
    qc_saturated   the largest fraction, over its channels, of pixels at 255 (clipped bright)
    qc_focus       variance of the 4-neighbour Laplacian of the channel-mean image: sharp edges give a large
                   variance, a blurred (out-of-focus) field a small one (Pech-Pacheco et al. 2000)

and its intensity profile (`intensity_profile`): per channel, the 1st, 25th, 50th, 75th and 99th percentile of
its pixel values (divided by 255) — what the image novelty score (evaluation/novelty.py) compares with the training
images' profiles, so that a field of another stain, exposure or modality is unlike the training images even where
the network's features are not.

Flags (`qc_flags`):

    blank          qc_std < BLANK_STD (a flat field: empty well, missing channel, failed acquisition)
    saturated      qc_saturated > SATURATED_FRACTION
    out_of_focus   qc_focus below the training images' FOCUS_QUANTILE quantile of qc_focus, divided by
                   FOCUS_FACTOR (relative to the training data: an absolute sharpness depends on the
                   microscope, the magnification and the stain); not flagged without training quantiles

Example:
    >>> qc = image_qc(np.zeros((2, 3, 64, 64), np.uint8))
    >>> qc_flags(qc)["blank"]
    array([ True,  True])
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from cellmorph.data.store import Store
from cellmorph.io import write_npy
from cellmorph.storage import digest_ok, write_digest

QC_COLUMNS = ("qc_std", "qc_saturated", "qc_focus")
BLANK_STD = 2.0  # grey levels (of 255)
SATURATED_FRACTION = 0.25  # of one channel's pixels at 255
FOCUS_QUANTILE = 0.01
FOCUS_FACTOR = 2.0
FLAGS = ("blank", "saturated", "out_of_focus")
FLAG_TEXT = {
    "blank": f"pixel standard deviation < {BLANK_STD:g} grey levels (a flat field)",
    "saturated": f"more than {SATURATED_FRACTION:.0%} of one channel's pixels at 255",
    "out_of_focus": (f"Laplacian variance below the training images' {FOCUS_QUANTILE:.0%} quantile / {FOCUS_FACTOR:g} "
                     "(blurred relative to what the model was trained on)"),
}


def image_qc(images: np.ndarray) -> dict[str, np.ndarray]:
    """The QC numbers (QC_COLUMNS, float32, one per image) of a uint8 N x C x H x W batch."""
    x = _batch(images)
    return _qc(x, _histograms(x))


PROFILE_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


def intensity_profile(images: np.ndarray) -> np.ndarray:
    """Per image of a uint8 N x C x H x W batch: the PROFILE_QUANTILES of each channel's pixel values / 255, as one
    N x (C * 5) float32 row per image (channel-major). Exact for 8-bit pixels (from each channel's 256-bin histogram).

    >>> intensity_profile(np.full((1, 2, 4, 4), 51, np.uint8))
    array([[0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]], dtype=float32)"""
    return _profile(_histograms(_batch(images)))


def _batch(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected a uint8 N x C x H x W batch, got {x.dtype} {x.shape}")
    return x


def _histograms(x: np.ndarray) -> np.ndarray:
    """N x C x 256 pixel counts: the one pass over the pixels that the profile, the standard deviation and the
    saturation are all read from."""
    n, c = x.shape[:2]
    out = np.zeros((n, c, 256), np.int64)
    for i in range(n):
        for k in range(c):
            out[i, k] = np.bincount(x[i, k].ravel(), minlength=256)
    return out


def _qc(x: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """QC_COLUMNS from the batch and its histograms: std and saturation exactly from the counts (float64), focus
    from the channel sum in integers (the Laplacian of the channel mean is that of the sum / C)."""
    n, c = x.shape[:2]
    if n == 0:
        return {k: np.zeros(0, np.float32) for k in QC_COLUMNS}
    levels = np.arange(256, dtype=np.float64)
    both = counts.sum(axis=1)  # N x 256 over all channels
    total = both.sum(axis=1)
    mean = both @ levels / total
    std = np.sqrt((both * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / total)
    saturated = (counts[:, :, 255] / counts[:, 0].sum(axis=1, keepdims=True)).max(axis=1)
    if x.shape[2] >= 3 and x.shape[3] >= 3:
        s = x.sum(axis=1, dtype=np.int16 if c <= 32 else np.int32)  # |Laplacian| <= 4 x 255 x C: int16 up to C = 32
        lap = s[:, :-2, 1:-1] + s[:, 2:, 1:-1] + s[:, 1:-1, :-2] + s[:, 1:-1, 2:] - 4 * s[:, 1:-1, 1:-1]
        focus = lap.reshape(n, -1).var(axis=1) / c**2
    else:
        focus = np.zeros(n)
    return {"qc_std": std.astype(np.float32), "qc_saturated": saturated.astype(np.float32), "qc_focus": focus.astype(np.float32)}


def _profile(counts: np.ndarray) -> np.ndarray:
    n, c = counts.shape[:2]
    q = np.asarray(PROFILE_QUANTILES)
    cdf = counts.cumsum(axis=2) / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    out = (cdf[:, :, :, None] < q).sum(axis=2) / 255.0  # the first grey level whose CDF reaches q
    return out.astype(np.float32).reshape(n, c * len(q))


def focus_threshold(training_focus: np.ndarray) -> float:
    """The out-of-focus threshold from the training images' qc_focus values."""
    return float(np.quantile(np.asarray(training_focus, dtype=np.float64), FOCUS_QUANTILE) / FOCUS_FACTOR)


def qc_flags(qc: dict[str, np.ndarray], focus_min: float | None = None) -> dict[str, np.ndarray]:
    """Boolean flags (FLAGS) per image from `image_qc` numbers; out_of_focus needs `focus_min` (`focus_threshold`
    of the training images), else it is all False."""
    std = np.asarray(qc["qc_std"])
    flags = {"blank": std < BLANK_STD, "saturated": np.asarray(qc["qc_saturated"]) > SATURATED_FRACTION}
    focus = np.asarray(qc["qc_focus"])
    flags["out_of_focus"] = (focus < focus_min) & ~flags["blank"] if focus_min is not None else np.zeros(len(std), bool)
    return flags


def image_numbers(images: np.ndarray) -> dict[str, np.ndarray]:
    """`image_qc` of a uint8 batch, plus its `intensity_profile` under "profile" (N x C*5), from one histogram pass:
    what the streaming passes keep (about 0.5 ms per 256 x 256 x 3 image on one core)."""
    x = _batch(images)
    counts = _histograms(x)
    return _qc(x, counts) | {"profile": _profile(counts)}


def _joined(parts: list[dict[str, np.ndarray]], channels: int) -> dict[str, np.ndarray]:
    if not parts:
        return {k: np.zeros(0, np.float32) for k in QC_COLUMNS} | {"profile": np.zeros((0, channels * len(PROFILE_QUANTILES)), np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in (*QC_COLUMNS, "profile")}


def qc_of_batches(batches, channels: int = 3) -> dict[str, np.ndarray]:
    """`image_numbers` of a stream of (rows, uint8 batch), concatenated in stream order (`channels`: for an empty stream)."""
    return _joined([image_numbers(images) for _, images in batches], channels)


def qc_cache_path(store: Store) -> Path:
    """Where the QC numbers of every image of `store` are cached: $CELLMORPH_CACHE/qc/STORE_KEY.npy (the store key
    names the data's content and the image size, so a changed image is a new file, never a stale one)."""
    return store.cache_root / "qc" / f"{store.key}.npy"


def cached_store_qc(store: Store) -> dict[str, np.ndarray] | None:
    """The cached QC numbers of every image of `store` (QC_COLUMNS, in row order, and "profile": N x C*5 intensity
    profiles), or None when absent, of an older layout, or when the file does not match its recorded content hash."""
    path = qc_cache_path(store)
    if not path.is_file() or not digest_ok(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    width = store.shape[1] * len(PROFILE_QUANTILES)
    if arr.shape != (len(QC_COLUMNS) + width, len(store.index)):
        return None
    return {k: arr[i] for i, k in enumerate(QC_COLUMNS)} | {"profile": np.ascontiguousarray(arr[len(QC_COLUMNS):].T)}


def save_store_qc(store: Store, qc: dict[str, np.ndarray]) -> None:
    """Cache the QC numbers and intensity profiles of every image of `store` (atomically, with a content hash)."""
    path = qc_cache_path(store)
    rows = [np.asarray(qc[k], np.float32) for k in QC_COLUMNS] + list(np.asarray(qc["profile"], np.float32).T)
    write_npy(path, np.stack(rows), what="cache")
    write_digest(path)


def store_qc(store: Store, batch: int = 64) -> dict[str, np.ndarray]:
    """The QC numbers and intensity profiles of every image of `store`: from the cache, else streamed through
    `image_numbers` and cached."""
    hit = cached_store_qc(store)
    if hit is None:
        hit = qc_of_batches(store.batches(batch), store.shape[1])
        save_store_qc(store, hit)
    return hit


class QCTap:
    """Passes a stream of (rows, uint8 batch) through unchanged while computing each batch's `image_numbers` (QC and
    intensity profile), so that a pass that decodes every image anyway (the frozen features) leaves them too;
    `result()` after the stream is consumed.

        >>> tap = QCTap(store.batches(32)); feats = forward(tap); save_store_qc(store, tap.result())
    """

    def __init__(self, batches, channels: int = 3) -> None:
        self._batches, self._parts, self._channels = batches, [], channels

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, images in self._batches:
            self._parts.append(image_numbers(images))
            yield rows, images

    def result(self) -> dict[str, np.ndarray]:
        return _joined(self._parts, self._channels)
