"""The preprocessed image store: uint8 N x C x H x W + the ImageTable's metadata, cached on disk.

Built once per (dataset files, image size) and reused by every run: the key hashes every image
path with its content (a fast hash, recomputed only when the file's size, mtime, inode or ctime changed),
so an edited file rebuilds the store, even when its size and mtime were kept.

A table of patches (`ImageTable.patch_size > 0`, e.g. nuclei in datasets/crchisto.py) stores one
patch per row instead of one whole image: each source image is decoded once and every patch centred
on its rows' (Metadata_Center_X, Metadata_Center_Y) is cut from it, mirror-padded at the borders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError
from cellmorph.io import write_npy, write_parquet, write_text
from cellmorph.data.preprocess import image_dtype, intensity_mapping, load_field, read_image, resize_uint8
from cellmorph.progress import console, make_progress
from cellmorph.storage import DIGEST_SUFFIX, PREPARED, digest_ok, file_digest, write_digest

STORE_VERSION = 1
CACHE_ENV = "CELLMORPH_CACHE"
STORE_FILES = ("images.npy", "index.parquet")  # written in this order, then their content hashes: a store is complete when both match


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cellmorph")


@dataclass
class Store:
    images: np.ndarray  # N x C x H x W uint8
    index: pd.DataFrame  # the ImageTable's rows, same order
    key: str


def store_key(table: ImageTable, image_size: int, cache: Path | None = None) -> str:
    """The data fingerprint: a hash of the dataset name, the image size, the patch centres and every image file's
    path and CONTENT (file_digests). A file rewritten with its size and mtime kept (`cp -p`, `rsync -t`, a
    1-second-mtime file system) has another content hash, so it gets another store and another run fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": STORE_VERSION, "dataset": table.name, "size": image_size, "patch": table.patch_size}).encode())
    if table.patch_size:
        centres = table.df[["Metadata_Center_X", "Metadata_Center_Y"]].to_numpy(dtype=np.int64)
        h.update(np.ascontiguousarray(centres).tobytes())
    columns = {col: [str(p) for p in table.df[col]] for col in table.path_columns}
    digests = file_digests([p for paths in columns.values() for p in paths], Path(cache or cache_dir()), table.source)
    for paths in columns.values():
        for p in paths:
            h.update(f"{p}|{digests[p]}\n".encode())
    return h.hexdigest()[:20]


DIGEST_INDEX = "file-digests.json"  # path -> [size, mtime_ns, inode, ctime_ns, content hash], in the cache


def file_digests(paths: list[str], cache: Path, where: str = "") -> dict[str, str]:
    """Each file's content hash, hashed again only when its size, mtime, inode or ctime changed since it was
    last hashed (ctime cannot be set back by `touch -r`; a copy gets a new inode). The index of known hashes
    lives in the cache; a lost or damaged index only costs hashing again."""
    index_path = cache / DIGEST_INDEX
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    out, changed = {}, False
    for p in dict.fromkeys(paths):
        try:
            st = os.stat(p)
        except OSError:
            raise CellmorphError(f"{p}: image file not found ({where}).") from None
        meta = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = index.get(p)
        if isinstance(known, list) and known[:4] == meta and len(known) == 5:
            out[p] = known[4]
            continue
        try:
            out[p] = file_digest(p)
        except OSError as err:
            raise CellmorphError(f"{p}: cannot read the image file ({err.strerror}; {where}).") from None
        index[p] = [*meta, out[p]]
        changed = True
    if changed:
        try:
            write_text(index_path, json.dumps(index), "cache")
        except CellmorphError:
            pass  # an unwritable cache: the store build says so (the index only saves time)
    return out


def trained_on(table: ImageTable, store: Store, rows: int, seed: int) -> dict:
    """What a model fitted on `rows` rows of `table` (decoded in `store`) was trained on, as its bundle records
    it: dataset, rows, store key, seed, image shape, channel columns, and per channel column the source
    files' pixel type and its mapping to 0-255 (from the first row's headers; a prepared store's images
    were mapped by `cellmorph prepare`). `cellmorph predict` checks new images against it."""
    info = {"dataset": table.name, "images": int(rows), "store_key": store.key, "seed": int(seed),
            "image_shape": list(store.images.shape[2:]), "channel_columns": table.path_columns}
    if table.path_columns and table.store_dir is None and len(table.df):
        dtypes = {c: image_dtype(table.df[c].iloc[0]) for c in table.path_columns}
        info["source_dtypes"] = dtypes
        info["intensity"] = {c: intensity_mapping(d) for c, d in dtypes.items()}
    return info


def build_store(table: ImageTable, image_size: int = 0, cache: Path | None = None, workers: int | None = None) -> Store:
    """Decode every image once into a uint8 array; reuse the cached copy when the key matches.

    images.npy and then index.parquet are each written under a temporary name and renamed, then their content
    hashes (`NAME.blake2b`); a store is read only when both files match their hashes, so a store damaged on
    disk (truncated, or bytes changed at the same size) is decoded again, and the console says so. A build
    holds its store folder's lock: a second process building the same store waits and reuses the result, and
    any temporary found under the lock is a killed build's leftover (tens of MB), removed.
    """
    if table.store_dir is not None:  # made by `cellmorph prepare`: already decoded
        return open_prepared(table.store_dir, image_size)
    root = Path(cache or cache_dir())
    key = store_key(table, image_size, root)
    folder = root / "store" / key
    images_path, index_path = folder / STORE_FILES[0], folder / STORE_FILES[1]
    complete = lambda: all(digest_ok(folder / f) for f in STORE_FILES)  # noqa: E731 - written last, checked on every read
    if not complete():
        with _build_lock(root, folder):
            if not complete():
                if images_path.is_file() or index_path.is_file():
                    console.print(f"the cached store {folder} is incomplete or damaged (checksum mismatch): decoding the images again")
                _remove_stale_temporaries(folder)
                workers = workers or min(8, os.cpu_count() or 1)
                images = _cut_all_patches(table, image_size, workers) if table.patch_size else _decode_all(table, image_size, workers)
                write_npy(images_path, images, what="cache")
                write_parquet(index_path, table.df, what="cache")
                for f in STORE_FILES:
                    write_digest(folder / f)
                return Store(images, table.df.copy(), key)
    return Store(np.load(images_path), pd.read_parquet(index_path), key)


@contextmanager
def _build_lock(root: Path, folder: Path):
    """Hold an exclusive lock on the store folder (creating it): one build per store at a time."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".build.lock", "a")
    except OSError as err:
        raise CellmorphError(f"the cache folder {root} is not writable; set {CACHE_ENV} to a writable folder ({err.strerror}: {folder}).") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove what a killed write of this store's own files left: io.atomic_path names it `.<file>.tmp-*`."""
    for name in (*STORE_FILES, *(f + DIGEST_SUFFIX for f in STORE_FILES)):
        for tmp in folder.glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)


def _decode_all(table: ImageTable, image_size: int, workers: int) -> np.ndarray:
    """N x C x H x W uint8, one row's files stacked per image, in table order."""
    paths = table.df[table.path_columns].astype(str).values.tolist()
    first = load_field(paths[0], image_size)
    images = np.empty((len(paths), *first.shape), dtype=np.uint8)
    images[0] = first
    with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task(f"decoding {table.name}", total=len(paths), completed=1)
        for i, arr in enumerate(pool.map(lambda ps: load_field(ps, image_size), paths[1:]), start=1):
            if arr.shape != first.shape:
                raise CellmorphError(_shape_mismatch(paths[i], arr.shape, paths[0], first.shape))
            images[i] = arr
            progress.advance(task)
    return images


def _shape_mismatch(row: list[str], shape: tuple, first_row: list[str], first_shape: tuple) -> str:
    """Say what differs between a row's C x H x W and the first row's, and the fix for that difference."""
    if shape[0] != first_shape[0]:
        counts = [(p, read_image(p).shape[2], p0, read_image(p0).shape[2]) for p, p0 in zip(row, first_row)]
        diffs = [f"{p} has {c} channel(s) where the first row's {p0} has {c0}" for p, c, p0, c0 in counts if c != c0]
        return (
            f"{'; '.join(diffs)}. Every row's images must give the same channels: make every image of a column "
            "RGB or every one grey (e.g. convert the grey ones to RGB)."
        )
    return (
        f"{', '.join(row)}: {shape[1]}x{shape[2]} pixels but the first row's {', '.join(first_row)} {first_shape[1]}x{first_shape[2]}. "
        "Set dataset.image_size in the config to resize every image to one size."
    )


def cut_patches(image: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: int) -> np.ndarray:
    """Patches of `size` x `size` from a C x H x W image, one per 0-based centre (cx[i], cy[i]).

    The centre pixel lands at index size // 2 in both axes; the image is mirror-padded (reflect)
    so patches at the border are whole.
    """
    c, h, w = image.shape
    if len(cx) and (cx.min() < 0 or cy.min() < 0 or cx.max() >= w or cy.max() >= h):
        raise ValueError(f"patch centre outside the {w} x {h} image")
    half = size // 2
    padded = np.pad(image, ((0, 0), (half, size - half), (half, size - half)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))  # C x H' x W' x size x size
    return np.ascontiguousarray(windows[:, cy, cx].transpose(1, 0, 2, 3))  # N x C x size x size


def _cut_all_patches(table: ImageTable, image_size: int, workers: int) -> np.ndarray:
    """Decode each source image once, cut its rows' patches; N x C x P x P uint8 in table order."""
    df = table.df
    size = table.patch_size
    groups = list(df.groupby(table.path_columns, sort=False).indices.items())

    def work(item):
        paths, rows = item
        paths = [paths] if isinstance(paths, str) else list(paths)
        image = load_field(paths, 0)
        cx = df["Metadata_Center_X"].to_numpy()[rows]
        cy = df["Metadata_Center_Y"].to_numpy()[rows]
        try:
            patches = cut_patches(image, cx, cy, size)
        except ValueError as err:
            raise CellmorphError(f"{paths[0]}: {err} ({table.source}). Fix the centre columns of those rows.") from None
        if image_size and image_size != size:
            patches = np.stack([resize_uint8(p.transpose(1, 2, 0), image_size).transpose(2, 0, 1) for p in patches])
        return rows, patches

    out = first_paths = None
    with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task(f"cutting {table.name} patches", total=len(df))
        for rows, patches in pool.map(work, groups):
            paths = df.iloc[rows[0]][table.path_columns].astype(str).tolist()
            if out is None:
                out, first_paths = np.empty((len(df), *patches.shape[1:]), dtype=np.uint8), paths
            elif patches.shape[1:] != out.shape[1:]:
                raise CellmorphError(_shape_mismatch(paths, patches.shape[1:], first_paths, out.shape[1:]))
            out[rows] = patches
            progress.advance(task, len(rows))
    return out


# --- Prepared stores (`cellmorph prepare`): a folder holding images.npy, index.parquet, prepared.json ---------



def open_prepared(folder: str | Path, image_size: int = 0, mmap: bool = False) -> Store:
    """Open a store written by `cellmorph prepare` (in memory, or memory-mapped when mmap=True)."""
    folder = Path(folder)
    missing = [f for f in PREPARED.files if not (folder / f).is_file()]
    if missing:
        raise CellmorphError(
            f"{folder}: not a prepared store (missing {missing}). Make one with `cellmorph prepare NAME --out {folder}`; "
            "an interrupted prepare leaves no prepared.json: run it again."
        )
    images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None)
    index = pd.read_parquet(folder / "index.parquet")
    if len(index) != len(images):
        raise CellmorphError(f"{folder}: index.parquet has {len(index)} rows but images.npy {len(images)} images; prepare it again.")
    if image_size and images.shape[-2:] != (image_size, image_size):
        raise CellmorphError(
            f"{folder}: prepared at {images.shape[-2]}x{images.shape[-1]} pixels but dataset.image_size = {image_size}. "
            f"Set dataset.image_size = 0, or prepare again with --image-size {image_size}."
        )
    key = hashlib.sha256((folder / "prepared.json").read_bytes()).hexdigest()[:20]
    return Store(images, index, key)
