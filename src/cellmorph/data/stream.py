"""Images as a stream of uint8 batches: decoded by a pool of threads ahead of the consumer, in bounded memory.

A screen does not fit in memory (one 384-well Cell Painting plate is ~3,500 fields x 5 channels); the models
only ever need one batch at a time. `field_batches` yields the rows of a table in the order given, `batch`
rows at a time, as uint8 B x C x H x W arrays decoded exactly as the store decodes them (`load_field`, or
the patches of a patch table), while up to `prefetch` further batches are being decoded by `workers`
threads (Pillow, tifffile and numpy release the GIL while they decode and resize, so decoding overlaps the
network's forward pass). Memory: `prefetch` + 1 batches of pixels, whatever the number of images.

The batches are the same for every consumer (the same rows in the same order, cut at the same places), so
a network sees exactly the batches it saw when the images were decoded into one array first: the
streamed features equal the in-memory ones bit for bit (tests/data/test_stream.py).

Example:
    >>> for rows, images in field_batches(table, image_size=0, batch=32):
    ...     images.shape  # (32, 3, 256, 256) uint8; rows: their row positions in table.df
"""

from __future__ import annotations

import os
from pathlib import Path
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from cellmorph.data.preprocess import load_field, read_image, resize_uint8
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError


def default_workers() -> int:
    """Decoding threads: the machine's cores, at most 8 (decoding is a few ms per field; more threads only wait)."""
    return max(1, min(8, os.cpu_count() or 1))


def field_batches(table: ImageTable, image_size: int = 0, rows: np.ndarray | None = None, batch: int = 32,
                  workers: int | None = None, prefetch: int | None = None,
                  annotate: Callable[[np.ndarray], dict] | None = None, chunks: list[np.ndarray] | None = None) -> Iterator[tuple]:
    """(row positions, uint8 B x C x H x W) for `rows` of `table` (all rows when None), in that order, `batch` at
    a time; every batch has the first one's C x H x W or a one-line CellmorphError names the files that differ.
    With `annotate`, (row positions, batch, annotate(batch)): per-image numbers of the pixels (e.g. the QC
    numbers, `quality.image_numbers`) computed in the decoding thread, beside the network rather than before it.

    Args:
        table: the ImageTable (one field per row, or one patch per row when `table.patch_size`).
        image_size: resize each field to image_size x image_size (0: keep), as `store.build_store`.
        rows: row positions into table.df.
        batch: rows per batch (the consumer's batch size: the network then sees the same batches as from an array).
        workers: decoding threads (default `default_workers()`); prefetch: batches decoded ahead (default 2 x workers).
        annotate: a function of a uint8 batch run in the decoding thread (numpy releases the GIL in it).
        chunks: the batches' row positions, given whole (then `rows` and `batch` are not used): e.g. several
            shards' batches as one stream, so that decoding runs ahead across their boundaries.
    """
    if chunks is None:
        rows = np.arange(len(table.df)) if rows is None else np.asarray(rows, dtype=np.int64)
        chunks = [rows[s : s + batch] for s in range(0, len(rows), batch)]
    if table.store_dir is not None:
        decode = _store_decoder(table, image_size)
    else:
        decode = _patch_decoder(table, image_size) if table.patch_size else _field_decoder(table, image_size)
    if annotate is not None:
        decode = _annotated(decode, annotate)
    workers = workers or default_workers()
    prefetch = max(1, prefetch or 2 * workers)
    first: tuple | None = None
    pending: deque[tuple[np.ndarray, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="cellmorph-decode") as pool:
        todo = iter(chunks)
        try:
            for chunk in todo:
                pending.append((chunk, pool.submit(decode, chunk)))
                if len(pending) >= prefetch:
                    break
            while pending:
                chunk, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(decode, nxt)))
                images = future.result()
                notes = None
                if annotate is not None:
                    images, notes = images
                if first is None:
                    first = (chunk[0], images.shape[1:])
                elif images.shape[1:] != first[1]:
                    raise CellmorphError(shape_mismatch(_paths(table, chunk[0]), images.shape[1:], _paths(table, first[0]), first[1]))
                yield (chunk, images) if annotate is None else (chunk, images, notes)
        finally:  # the consumer stopped early (an error, Ctrl-C): drop what is queued, wait for what runs
            for _, future in pending:
                future.cancel()


def _annotated(decode, annotate):
    def both(chunk: np.ndarray) -> tuple[np.ndarray, dict]:
        images = decode(chunk)
        return images, annotate(images)

    return both


def _paths(table: ImageTable, row: int) -> list[str]:
    return table.df.iloc[int(row)][table.path_columns].astype(str).tolist()


def _store_decoder(table: ImageTable, image_size: int):
    """A store made by `cellmorph prepare`: rows read from its memory-mapped images.npy (already 8-bit)."""
    images = np.load(Path(table.store_dir) / "images.npy", mmap_mode="r")
    if len(images) != len(table.df):
        raise CellmorphError(f"{table.store_dir}: images.npy holds {len(images)} images but its index {len(table.df)} rows; prepare it again.")

    def decode(chunk: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(images[chunk])
        if image_size and out.shape[-2:] != (image_size, image_size):
            out = np.stack([resize_uint8(im.transpose(1, 2, 0), image_size).transpose(2, 0, 1) for im in out])
        return out

    return decode


def _field_decoder(table: ImageTable, image_size: int):
    paths = table.df[table.path_columns].astype(str).to_numpy()

    def decode(chunk: np.ndarray) -> np.ndarray:
        which = "the first row's" if chunk[0] == 0 else f"row {chunk[0]}'s"
        first = load_field(list(paths[chunk[0]]), image_size)
        out = np.empty((len(chunk), *first.shape), dtype=np.uint8)
        out[0] = first
        for k, r in enumerate(chunk[1:], start=1):
            arr = load_field(list(paths[r]), image_size)
            if arr.shape != first.shape:
                raise CellmorphError(shape_mismatch(list(paths[r]), arr.shape, list(paths[chunk[0]]), first.shape, which))
            out[k] = arr
        return out

    return decode


def _patch_decoder(table: ImageTable, image_size: int):
    """Patch tables: each source image of the chunk decoded once, its rows' patches cut (store.cut_patches)."""
    df = table.df
    size = table.patch_size
    paths = df[table.path_columns].astype(str).to_numpy()
    cx_all, cy_all = df["Metadata_Center_X"].to_numpy(), df["Metadata_Center_Y"].to_numpy()

    def decode(chunk: np.ndarray) -> np.ndarray:
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(chunk):
            groups.setdefault(tuple(paths[r]), []).append(k)
        out = None
        for source, ks in groups.items():
            image = load_field(list(source), 0)
            rows = chunk[ks]
            try:
                patches = cut_patches(image, cx_all[rows], cy_all[rows], size)
            except ValueError as err:
                raise CellmorphError(f"{source[0]}: {err} ({table.source}). Fix the centre columns of those rows.") from None
            if image_size and image_size != size:
                patches = np.stack([resize_uint8(p.transpose(1, 2, 0), image_size).transpose(2, 0, 1) for p in patches])
            if out is None:
                out = np.empty((len(chunk), *patches.shape[1:]), dtype=np.uint8)
            elif patches.shape[1:] != out.shape[1:]:
                raise CellmorphError(shape_mismatch(list(source), patches.shape[1:], list(paths[chunk[0]]), out.shape[1:]))
            out[ks] = patches
        return out

    return decode


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


def shape_mismatch(row: list[str], shape: tuple, first_row: list[str], first_shape: tuple, which: str = "the first row's") -> str:
    """Say what differs between a row's C x H x W and the first row's, and the fix for that difference."""
    if shape[0] != first_shape[0]:
        counts = [(p, read_image(p).shape[2], p0, read_image(p0).shape[2]) for p, p0 in zip(row, first_row)]
        diffs = [f"{p} has {c} channel(s) where {which} {p0} has {c0}" for p, c, p0, c0 in counts if c != c0]
        return (
            f"{'; '.join(diffs)}. Every row's images must give the same channels: make every image of a column "
            "RGB or every one grey (e.g. convert the grey ones to RGB)."
        )
    return (
        f"{', '.join(row)}: {shape[1]}x{shape[2]} pixels but {which} {', '.join(first_row)} {first_shape[1]}x{first_shape[2]}. "
        "Set dataset.image_size in the config to resize every image to one size."
    )
