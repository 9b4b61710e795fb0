"""The preprocessed image store: uint8 N x C x H x W + the ImageTable's metadata, cached on disk.

Built once per (dataset files, image size) and reused by every run: the key hashes every image
path with its size and modification time, so an edited file rebuilds the store.
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

    @property
    def shape(self) -> tuple[int, ...]:
        return self.images.shape


def store_key(table: ImageTable, image_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": STORE_VERSION, "dataset": table.name, "size": image_size}).encode())
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
