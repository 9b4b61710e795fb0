"""The preprocessed image store: uint8 N x C x H x W + the ImageTable's metadata, cached on disk.

Built once per (dataset files, image size) and reused by every run: the key hashes every image
path with its size and modification time, so an edited file rebuilds the store.

A table of patches (`ImageTable.patch_size > 0`, e.g. nuclei in datasets/crchisto.py) stores one
patch per row instead of one whole image: each source image is decoded once and every patch centred
on its rows' (Metadata_Center_X, Metadata_Center_Y) is cut from it, mirror-padded at the borders.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.datasets.table import ImageTable
from cellmorph.errors import CellmorphError
from cellmorph.io import write_npy, write_parquet
from cellmorph.preprocess import load_field
from cellmorph.progress import make_progress

STORE_VERSION = 1
CACHE_ENV = "CELLMORPH_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cellmorph")


@dataclass
class Store:
    images: np.ndarray  # N x C x H x W uint8
    index: pd.DataFrame  # the ImageTable's rows, same order
    key: str


def store_key(table: ImageTable, image_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": STORE_VERSION, "dataset": table.name, "size": image_size, "patch": table.patch_size}).encode())
    if table.patch_size:
        centres = table.df[["Metadata_Center_X", "Metadata_Center_Y"]].to_numpy(dtype=np.int64)
        h.update(np.ascontiguousarray(centres).tobytes())
    for col in table.path_columns:
        for p in table.df[col]:
            try:
                st = os.stat(p)
            except OSError:
                raise CellmorphError(f"{p}: image file not found ({table.source}, column {col}).") from None
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_store(table: ImageTable, image_size: int = 0, cache: Path | None = None, workers: int | None = None) -> Store:
    """Decode every image once into a uint8 array; reuse the cached copy when the key matches."""
    if table.store_dir is not None:  # made by `cellmorph prepare`: already decoded
        return open_prepared(table.store_dir, image_size)
    key = store_key(table, image_size)
    folder = (cache or cache_dir()) / "store" / key
    images_path, index_path = folder / "images.npy", folder / "index.parquet"
    if images_path.is_file() and index_path.is_file():
        return Store(np.load(images_path), pd.read_parquet(index_path), key)
    if table.patch_size:
        images = _cut_all_patches(table, image_size, workers or min(8, os.cpu_count() or 1))
        write_npy(images_path, images)
        write_parquet(index_path, table.df.copy())
        return Store(images, table.df.copy(), key)

    paths = table.df[table.path_columns].astype(str).values.tolist()
    workers = workers or min(8, os.cpu_count() or 1)
    first = load_field(paths[0], image_size)
    images = np.empty((len(paths), *first.shape), dtype=np.uint8)
    images[0] = first
    with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task(f"decoding {table.name}", total=len(paths), completed=1)
        for i, arr in enumerate(pool.map(lambda ps: load_field(ps, image_size), paths[1:]), start=1):
            if arr.shape != first.shape:
                raise CellmorphError(
                    f"{paths[i]}: image shape {arr.shape} differs from the first image's {first.shape}. "
                    "Set dataset.image_size in the config to resize every image to one size."
                )
            images[i] = arr
            progress.advance(task)
    index = table.df.copy()
    write_npy(images_path, images)
    write_parquet(index_path, index)
    return Store(images, index, key)


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
    from cellmorph.preprocess import resize_uint8

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

    out = None
    with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task(f"cutting {table.name} patches", total=len(df))
        for rows, patches in pool.map(work, groups):
            if out is None:
                out = np.empty((len(df), *patches.shape[1:]), dtype=np.uint8)
            elif patches.shape[1:] != out.shape[1:]:
                raise CellmorphError(f"patches of {df.iloc[rows[0]][table.path_columns[0]]} have {patches.shape[1]} channels; the first image had {out.shape[1]}.")
            out[rows] = patches
            progress.advance(task, len(rows))
    return out


# --- Prepared stores (`cellmorph prepare`): a folder holding images.npy, index.parquet, prepared.json ---------

PREPARED_FILES = ("images.npy", "index.parquet", "prepared.json")


def open_prepared(folder: str | Path, image_size: int = 0, mmap: bool = False) -> Store:
    """Open a store written by `cellmorph prepare` (in memory, or memory-mapped when mmap=True)."""
    folder = Path(folder)
    missing = [f for f in PREPARED_FILES if not (folder / f).is_file()]
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
