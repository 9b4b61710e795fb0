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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError
from cellmorph.io import write_npy, write_parquet, write_text
from cellmorph.data.omezarr import is_zarr_ref, zarr_ref_digest, zarr_ref_stat
from cellmorph.data.preprocess import image_dtype, intensity_mapping
from cellmorph.data.stream import field_batches
from cellmorph.progress import console, make_progress
from cellmorph.storage import DIGEST_SUFFIX, PREPARED, digest_ok, file_digest, write_digest

STORE_VERSION = 1
CACHE_ENV = "CELLMORPH_CACHE"
STORE_FILES = ("images.npy", "index.parquet")  # written in this order, then their content hashes: a store is complete when both match


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cellmorph")


class Store:
    """A table's images as uint8 N x C x H x W, keyed by the data fingerprint. Lazy: `images` decodes them all
    into memory on first use (the cached copy when present, as `build_store` always did), `batches` streams them
    without ever holding them all (from the cached or prepared array when there is one, else from the files)."""

    def __init__(self, images: np.ndarray | None, index: pd.DataFrame, key: str, *, table: ImageTable | None = None,
                 image_size: int = 0, cache: Path | None = None, on_disk: Path | None = None, shape: tuple | None = None):
        self._images, self.index, self.key = images, index, key
        self._table, self._size, self._cache = table, image_size, cache
        self._on_disk = on_disk  # a folder whose images.npy holds these images (the cache's, checked by hash; or a prepared store's)
        self._shape: tuple | None = tuple(images.shape) if images is not None else shape

    def _disk_array(self, mmap: bool) -> np.ndarray | None:
        """The images.npy of the cache (when complete and matching its hashes) or of the prepared store, or None."""
        folder = self._on_disk
        if folder is None or (self._table is not None and not all(digest_ok(folder / f) for f in STORE_FILES)):
            return None
        return np.load(folder / STORE_FILES[0], mmap_mode="r" if mmap else None)

    @property
    def cache_root(self) -> Path:
        """The cache folder this store's derived files go to (its own, else $CELLMORPH_CACHE's)."""
        return Path(self._cache or cache_dir())

    @property
    def images(self) -> np.ndarray:
        """All the images in memory (decoded, and cached on disk, the first time)."""
        if self._images is None:
            array = self._disk_array(mmap=False)
            if array is None and self._table is None:
                raise CellmorphError("this store was shipped without its pixels (a bug; please report it).")
            self._images = array if array is not None else _materialize(self._table, self._size, Path(self._cache or cache_dir()), self.key)
            self._shape = tuple(self._images.shape)
        return self._images

    @property
    def decoded(self) -> bool:
        """Whether the pixels are in memory (no decoding needed)."""
        return self._images is not None

    @property
    def shape(self) -> tuple:
        """N x C x H x W, without decoding more than one row."""
        if self._shape is None:
            _, first = next(self.batches(1, rows=np.arange(1), workers=1))
            self._shape = (len(self.index), *first.shape[1:])
        return self._shape

    def batches(self, batch: int, rows: np.ndarray | None = None, workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row positions, uint8 batch) in order, `batch` rows at a time (stream.field_batches): slices of the array in
        memory or on disk (memory-mapped) when there is one, else decoded from the files ahead of the consumer."""
        rows = np.arange(len(self.index)) if rows is None else np.asarray(rows, dtype=np.int64)
        array = self._images if self._images is not None else self._disk_array(mmap=True)
        if array is not None:
            for s in range(0, len(rows), batch):
                chunk = rows[s : s + batch]
                yield chunk, np.ascontiguousarray(array[chunk])
            return
        if self._table is None:
            raise CellmorphError("this store was shipped without its pixels (a bug; please report it).")
        yield from field_batches(self._table, self._size, rows, batch, workers)

    def without_pixels(self) -> Store:
        """The same store (key, index, shape) holding no pixels: what travels to workers that need none."""
        return Store(None, self.index, self.key, shape=self.shape)


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
        zarr = is_zarr_ref(p)  # an OME-Zarr plane: its array's files stat-ed, its pixels hashed
        try:
            if zarr:
                meta = zarr_ref_stat(p)
            else:
                st = os.stat(p)
                meta = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        except OSError:
            raise CellmorphError(f"{p}: image file not found ({where}).") from None
        known = index.get(p)
        if isinstance(known, list) and known[:4] == meta and len(known) == 5:
            out[p] = known[4]
            continue
        try:
            out[p] = zarr_ref_digest(p) if zarr else file_digest(p)
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
            "image_shape": list(store.shape[2:]), "channel_columns": table.path_columns}
    if table.path_columns and table.store_dir is None and len(table.df):
        dtypes = {c: image_dtype(table.df[c].iloc[0]) for c in table.path_columns}
        info["source_dtypes"] = dtypes
        info["intensity"] = {c: intensity_mapping(d) for c, d in dtypes.items()}
    return info


def open_store(table: ImageTable, image_size: int = 0, cache: Path | None = None) -> Store:
    """The store of `table` at `image_size`, nothing decoded yet: its key (the data fingerprint) and index; the pixels
    come from `Store.images` (all in memory, decoded once and cached) or `Store.batches` (streamed, bounded memory:
    nothing written to the cache). A store made by `cellmorph prepare` is memory-mapped."""
    if table.store_dir is not None:  # made by `cellmorph prepare`: already decoded, read from disk batch by batch
        prepared = open_prepared(table.store_dir, image_size, mmap=True)
        return Store(None, prepared.index, prepared.key, on_disk=Path(table.store_dir), shape=tuple(prepared.images.shape))
    root = Path(cache or cache_dir())
    key = store_key(table, image_size, root)
    return Store(None, table.df.copy(), key, table=table, image_size=image_size, cache=root, on_disk=root / "store" / key)


def build_store(table: ImageTable, image_size: int = 0, cache: Path | None = None, workers: int | None = None) -> Store:
    """Decode every image once into a uint8 array; reuse the cached copy when the key matches (`open_store`, then
    its `images`).

    images.npy and then index.parquet are each written under a temporary name and renamed, then their content
    hashes (`NAME.blake2b`); a store is read only when both files match their hashes, so a store damaged on
    disk (truncated, or bytes changed at the same size) is decoded again, and the console says so. A build
    holds its store folder's lock: a second process building the same store waits and reuses the result, and
    any temporary found under the lock is a killed build's leftover (tens of MB), removed.
    """
    if table.store_dir is not None:
        return open_prepared(table.store_dir, image_size)
    store = open_store(table, image_size, cache)
    store.images  # noqa: B018 - decoded (or read from the cache) now: a corrupt image stops the caller here
    return store


def _materialize(table: ImageTable, image_size: int, root: Path, key: str) -> np.ndarray:
    """Decode every image of `table` into one array and cache it under `root`/store/`key` (or read the cached copy)."""
    folder = root / "store" / key
    images_path, index_path = folder / STORE_FILES[0], folder / STORE_FILES[1]
    complete = lambda: all(digest_ok(folder / f) for f in STORE_FILES)  # noqa: E731 - written last, checked on every read
    if not complete():
        with _build_lock(root, folder):
            if not complete():
                if images_path.is_file() or index_path.is_file():
                    console.print(f"the cached store {folder} is incomplete or damaged (checksum mismatch): decoding the images again")
                _remove_stale_temporaries(folder)
                images = _decode_all(table, image_size)
                write_npy(images_path, images, what="cache")
                write_parquet(index_path, table.df, what="cache")
                for f in STORE_FILES:
                    write_digest(folder / f)
                return images
    return np.load(images_path)


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


def _decode_all(table: ImageTable, image_size: int) -> np.ndarray:
    """N x C x H x W uint8 in table order, filled from the stream (one row's files stacked per image, or one patch
    per row of a patch table)."""
    out = None
    with make_progress() as progress:
        task = progress.add_task(f"{'cutting' if table.patch_size else 'decoding'} {table.name}", total=len(table.df))
        for rows, images in field_batches(table, image_size, batch=256 if table.patch_size else 32):
            if out is None:
                out = np.empty((len(table.df), *images.shape[1:]), dtype=np.uint8)
            out[rows] = images
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
