"""Screens: a table of new images scored in shards (a plate, or up to `SHARD_ROWS` of its fields, each), here or as
Ray tasks, each shard's outputs kept on disk as it finishes so that a killed job resumes with the shards it has.

A shard is streamed (`stream.field_batches`: decoded by threads ahead of the network, one batch of pixels in memory
at a time) through `Classifier.outputs`; what it returns per image (probabilities, features, MC-dropout std) is all
that accumulates. The shards, their batches and their seeds (MC dropout: the config's seed + the shard's index)
are the same whichever process computes them, so a screen scored on Ray equals the local one byte for byte on
the same kind of CPU (any thread count: `models.inference` runs every CPU forward in parts of 8 images on one
thread; MC dropout's passes at the same torch thread count, `[execution] threads`; tests/engine/test_screen.py).

Resume: with `resume` (a key naming the job: the model and the options), each finished shard is written to
$CELLMORPH_CACHE/screens/KEY/NNNNN-FINGERPRINT.npz (atomically, with its content hash), where FINGERPRINT hashes
the shard's rows and every one of their files' path, size, mtime, inode and ctime: a file changed since (even
rewritten in place) makes that shard new work, never a stale answer. The caller removes the folder once its own
output is written (`forget`).

Example:
    >>> out = score_screen(clf, table, image_size=0, features=True, resume="plate-7-job")
    >>> out["probs"].shape
    (3300, 6)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.config import ExecutionConfig
from cellmorph.data.omezarr import is_zarr_ref, zarr_ref_stat
from cellmorph.data.quality import QC_COLUMNS, image_numbers
from cellmorph.data.store import cache_dir
from cellmorph.data.stream import field_batches
from cellmorph.data.table import ImageTable
from cellmorph.engine.plan import torch_threads
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.novelty import image_distances, with_unit_features
from cellmorph.io import atomic_path
from cellmorph.progress import console, make_progress
from cellmorph.storage import digest_ok, write_digest

SHARD_ROWS = 2048  # fields per shard at most: a plate of ~3,500 fields is two shards; a lost worker costs one
SHARD_ROWS_ENV = "CELLMORPH_SHARD_ROWS"  # another maximum (smaller shards: more Ray tasks, less work lost to a kill)
SCREENS = "screens"


@dataclass(frozen=True)
class Shard:
    index: int
    name: str  # e.g. "plate Week1_22123 (1/2)"
    rows: np.ndarray  # row positions into the table


def shard_rows() -> int:
    """The maximum rows per shard: $CELLMORPH_SHARD_ROWS when set (a positive integer), else SHARD_ROWS."""
    raw = os.environ.get(SHARD_ROWS_ENV, "")
    if not raw:
        return SHARD_ROWS
    if not raw.isdigit() or int(raw) < 1:
        raise CellmorphError(f"{SHARD_ROWS_ENV}={raw!r}: expected a positive number of fields per shard, e.g. 2048.")
    return int(raw)


def plan_shards(df: pd.DataFrame, max_rows: int | None = None) -> list[Shard]:
    """The table's rows as shards: per Metadata_Plate (in order of first appearance) when the table has it, cut
    into pieces of at most `max_rows`; else pieces of `max_rows` in table order. Every row is in exactly one shard.

    >>> [s.name for s in plan_shards(table.df)]
    ['plate Week1_22123', 'plate Week1_22141']"""
    max_rows = max_rows or shard_rows()
    if "Metadata_Plate" in df.columns:
        groups = [(f"plate {k}", np.asarray(v)) for k, v in df.groupby("Metadata_Plate", sort=False, dropna=False).indices.items()]
    else:
        groups = [("rows", np.arange(len(df)))]
    shards = []
    for name, rows in groups:
        pieces = [rows[s : s + max_rows] for s in range(0, len(rows), max_rows)]
        for k, piece in enumerate(pieces):
            label = name if len(pieces) == 1 else f"{name} ({k + 1}/{len(pieces)})"
            if name == "rows":
                label = f"rows {piece[0]}-{piece[-1]}"
            shards.append(Shard(len(shards), label, piece))
    return shards


def shard_fingerprint(table: ImageTable, shard: Shard) -> str:
    """A hash of the shard's rows and each of their files' path, size, mtime, inode and ctime (cheap: no file is read)."""
    h = hashlib.sha256(np.ascontiguousarray(shard.rows).tobytes())
    if table.store_dir is not None:  # a prepared store: its files as a whole
        for name in ("images.npy", "prepared.json"):
            st = os.stat(Path(table.store_dir) / name)
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}\n".encode())
    for row in table.df.iloc[shard.rows][table.path_columns].astype(str).itertuples(index=False):
        for p in row:
            try:
                if is_zarr_ref(p):  # an OME-Zarr plane: its level-0 array's files
                    size, mtime, ino, ctime = zarr_ref_stat(p)
                else:
                    st = os.stat(p)
                    size, mtime, ino, ctime = st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns
            except OSError:
                raise CellmorphError(f"{p}: image file not found ({table.source}).") from None
            h.update(f"{p}|{size}|{mtime}|{ino}|{ctime}\n".encode())
    return h.hexdigest()[:16]


def per_image_numbers(clf):
    """The per-batch callback of `Classifier.outputs` that adds each image's QC numbers (data.quality.image_numbers,
    taken from the batch's notes when the decoding threads computed them, `field_batches(..., annotate=)`) and, when
    the classifier has an image reference, its image_distance and image_distance_pvalue (novelty.image_distances,
    with the image's intensity profile where the reference holds profiles): a few floats per image, computed while
    its batch is in memory."""
    ref = getattr(clf, "image_reference", None)
    ref = None if ref is None else with_unit_features(ref)

    def numbers(images: np.ndarray, feats: np.ndarray | None, pixels: dict | None = None) -> dict[str, np.ndarray]:
        pixels = image_numbers(images) if pixels is None else pixels  # usually computed in the decoding threads
        out = {k: pixels[k] for k in QC_COLUMNS}
        if ref is not None and feats is not None:
            profiles = pixels["profile"] if "profiles" in ref else None  # a version-1 reference: features alone
            out["image_distance"], out["image_distance_pvalue"] = image_distances(ref, feats, profiles)
        return out

    numbers.needs_features = ref is not None  # QC alone needs no features (a fine-tuned network's would cost a pass)
    return numbers


def score_shard(clf, table: ImageTable, image_size: int, shard: Shard, *, features: bool = False, mc_dropout: int = 0,
                fold_models=(), on_batch=None, quality: bool = False) -> dict[str, np.ndarray]:
    """One shard's per-image outputs (`Classifier.outputs` over its streamed batches); with `quality`, each image's
    QC numbers and image novelty (`per_image_numbers`)."""
    batches = field_batches(table, image_size, shard.rows, clf.batch_size, annotate=image_numbers if quality else None)
    return clf.outputs(batches, features=features, mc_dropout=mc_dropout, seed=clf.config.seed + shard.index,
                       fold_models=fold_models, on_batch=on_batch, per_batch=per_image_numbers(clf) if quality else None)


def score_shards_streamed(clf, table: ImageTable, image_size: int, shards: list[Shard], *, features: bool, quality: bool,
                          finished, on_batch=None) -> None:
    """Frozen models: `shards` scored as one stream of batches (each shard cut into batches as `score_shard` cuts
    it, so every batch, and so every number, is the one `score_shard` gives, here or on Ray), and `finished(shard,
    outputs)` called as soon as a shard's last batch is out. Decoding and the network run ahead across shard
    boundaries: a screen of many small plates (or a plate's last short batch) does not drain the pipeline."""
    size = clf.batch_size
    chunks, owner = [], []
    for s in shards:
        for i in range(0, len(s.rows), size):
            chunks.append(s.rows[i : i + size])
            owner.append(s)
    stream = field_batches(table, image_size, chunks=chunks, annotate=image_numbers if quality else None)
    parts: dict[str, list] = {}
    outs = clf.output_batches(stream, features=features, per_batch=per_image_numbers(clf) if quality else None)
    for k, (shard, out) in enumerate(zip(owner, outs)):
        for name, v in out.items():
            parts.setdefault(name, []).append(v)
        if on_batch is not None:
            on_batch(len(out["probs"]))
        if k + 1 == len(owner) or owner[k + 1] is not shard:
            finished(shard, {name: np.concatenate(v) for name, v in parts.items()})
            parts = {}


def screen_folder(resume: str) -> Path:
    return cache_dir() / SCREENS / resume


def job_key(*parts) -> str:
    """A resume key from the job's identity (the model's bundle hash, the options, the input's name)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]


def _shard_path(folder: Path, shard: Shard, fingerprint: str) -> Path:
    return folder / f"{shard.index:05d}-{fingerprint}.npz"


def _read_shard(path: Path) -> dict[str, np.ndarray] | None:
    if not (path.is_file() and digest_ok(path)):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


def _write_shard(path: Path, out: dict[str, np.ndarray]) -> None:
    with atomic_path(path, "cache") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
    write_digest(path)


def score_screen(clf, table: ImageTable, image_size: int, *, features: bool = False, mc_dropout: int = 0, fold_models=(),
                 resume: str | None = None, execution: ExecutionConfig | None = None, what: str = "predicting",
                 quality: bool = False) -> dict[str, np.ndarray]:
    """Every image's outputs, shard by shard (`plan_shards`), in table order: here, or on Ray when
    execution.backend == "ray" (one task per shard, `execution.max_retries` retries of a shard whose worker dies).
    With `resume`, finished shards are kept in the cache and reused by a rerun (see the module's docstring).
    With `quality`, also each image's QC numbers and image novelty (`per_image_numbers`)."""
    shards = plan_shards(table.df)
    folder = screen_folder(resume) if resume else None
    results = Outputs(len(table.df))
    paths: dict[int, Path] = {}
    if folder is not None:
        for s in shards:
            paths[s.index] = _shard_path(folder, s, shard_fingerprint(table, s))
            got = _read_shard(paths[s.index])
            if got is not None:
                results.place(s, got)
        if results.done:
            console.print(f"resuming: {len(results.done)} of {len(shards)} shards already scored ({folder})")

    def finished(s: Shard, out: dict[str, np.ndarray]) -> None:
        if folder is not None:
            _write_shard(paths[s.index], out)
        results.place(s, out)

    todo = [s for s in shards if s.index not in results.done]
    n_todo = int(sum(len(s.rows) for s in todo))
    passes = max(1, mc_dropout, len(fold_models))
    label = f"{what} {len(table.df)} images" + (f" ({mc_dropout} MC dropout passes)" if mc_dropout else f" with {len(fold_models)} fold models" if fold_models else "")
    with make_progress() as progress:
        task = progress.add_task(label, total=n_todo * passes if (execution is None or execution.backend == "local") else len(todo))
        if execution is not None and execution.backend == "ray" and todo:
            from cellmorph.engine.ray_backend import run_shards_on_ray

            run_shards_on_ray(execution, clf, table, image_size, todo, dict(features=features, mc_dropout=mc_dropout, fold_models=list(fold_models), quality=quality),
                              score_shard, finished, lambda: progress.advance(task))
        else:
            threads = execution.threads if execution is not None and execution.threads else 0
            with torch_threads(threads):
                if clf.config.mode == "frozen":  # one stream over the shards: decoding never waits at a plate's end
                    score_shards_streamed(clf, table, image_size, todo, features=features, quality=quality, finished=finished,
                                          on_batch=lambda n: progress.advance(task, n))
                else:
                    for s in todo:
                        finished(s, score_shard(clf, table, image_size, s, features=features, mc_dropout=mc_dropout, fold_models=fold_models,
                                                on_batch=lambda n: progress.advance(task, n * passes), quality=quality))
    missing = [s.name for s in shards if s.index not in results.done]
    if missing:  # every path above ends each shard in `finished` or raises: this would be a bug of ours
        raise CellmorphError(f"internal error: shards without outputs after scoring: {', '.join(missing[:3])}")
    return results.arrays


class Outputs:
    """The screen's outputs, one array per output in table order, filled shard by shard as each finishes: a field's
    outputs are copied once into arrays allocated once for the whole screen, and the shard's own arrays are freed
    at once. (Keeping every shard's arrays to the end and copying them then peaked higher: 1,580 against 1,507 MB
    for `cellmorph predict` of 19,800 fields with the quickstart bundle, same outputs; benchmarks/RESULTS.md.)"""

    def __init__(self, n: int) -> None:
        self.n, self.arrays, self.done = n, {}, set()

    def place(self, shard: Shard, out: dict[str, np.ndarray]) -> None:
        for k, v in out.items():
            if k not in self.arrays:
                self.arrays[k] = np.empty((self.n, *v.shape[1:]), dtype=v.dtype)
            self.arrays[k][shard.rows] = v
        self.done.add(shard.index)


def forget(resume: str | None) -> None:
    """Remove a finished job's shard folder (cellmorph's own, in the cache)."""
    if resume:
        shutil.rmtree(screen_folder(resume), ignore_errors=True)
