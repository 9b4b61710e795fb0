"""Any raw plate -> a prepared store: the paper's preprocessing (Kensert et al. 2019) with the plate's own settings.

`prepare_plate(fields, out, settings)` takes one row per field of view (`Image_Path_<Channel>` per raw single-channel
8- or 16-bit file, `Metadata_Plate`, `Metadata_Well`, any `Metadata_*`, and `Metadata_Role` "control"/"treatment"
when the plate is normalised by its controls) and writes images.npy + index.parquet + prepared.json, one plate at a
time (memory: a plate's histograms and illumination sums plus the fields in flight; crops go straight to disk).

Per plate, with `PlateSettings`:
  0. illumination = "plate": per channel, the mean of all the plate's fields, smoothed (Gaussian, sigma = 1/20 of the
     shorter side) and scaled so its 2nd percentile is 1 (CellProfiler's "regular" illumination function with a
     robust minimum); every field is divided by it and rounded back to its integer type before anything else;
  1. normalise = "controls": exact histograms of the control fields' raw values give, per channel, the mean and
     standard deviation of their Anscombe-transformed pixels; each field is Anscombe-transformed, z-scored with
     them and mapped to 0-255 by its own min and max over all channels, truncated to uint8 (BBBC021);
     normalise = "field": Anscombe and the field's own min-max, no controls needed (BBBC013/BBBC014);
  2. tiled into `grid` crops (1 x 1 = the whole field); with drop_empty, crops with <= 0.2% of values above 255/5.1
     are dropped (the paper's rule); crops optionally resized to image_size x image_size.

The built-in raw layouts are presets of this: `prepare bbbc021` (controls, 2 x 2, drop empty, 16-bit, the channels
Actin/Tubulin/DAPI as RGB) and `prepare bbbc013`/`bbbc014` (field, 4 x 4, a zero channel first). `prepare plate` is
the same path for a scientist's own LoadData CSV and plate map (data/datasets/plate.py).

Example:
    >>> settings = PlateSettings(channels=("DNA", "ER", "RNA", "AGP", "Mito"), grid=(1, 1), image_size=224)
    >>> settings.describe()[:40]
    'Anscombe 2*sqrt(x+3/8); z-score per plat'
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

from cellmorph.data.platemap import ROLE
from cellmorph.data.prepare import StoreWriter, chunks, load_recipe, read_raw_field
from cellmorph.data.preprocess import (
    EMPTY_FRACTION,
    EMPTY_LEVEL,
    anscombe_table,
    anscombe_stats,
    normalize_field,
    pixel_histogram,
    resize_uint8,
    zscore_tables,
)
from cellmorph.data.store import cache_dir
from cellmorph.errors import CellmorphError
from cellmorph.io import write_json, write_parquet
from cellmorph.progress import console, make_progress
from cellmorph.storage import remove_own_folder

NORMALISE = ("controls", "field")
ILLUMINATION = ("none", "plate")


@dataclass(frozen=True)
class PlateSettings:
    """How a raw plate becomes a store (see the module docstring); the defaults are the paper's for BBBC021."""

    channels: tuple[str, ...]
    normalise: str = "controls"
    grid: tuple[int, int] = (2, 2)
    drop_empty: bool = True
    image_size: int = 0
    illumination: str = "none"
    include_controls: bool = False  # "controls": also write the control fields' crops (e.g. DMSO as a class)
    zero_channel: bool = False  # a zero channel first (2-channel translocation plates shown as RGB)
    square_fields: bool = False  # area-resize each field to height x height first (BBBC014, as the paper)
    bit_depth: int = 0  # 8 or 16: every file must have it; 0: any 8- or 16-bit, the same within a plate

    def __post_init__(self):
        if self.normalise not in NORMALISE:
            raise CellmorphError(f"--normalise {self.normalise}: choose one of {', '.join(NORMALISE)}.")
        if self.illumination not in ILLUMINATION:
            raise CellmorphError(f"--illumination {self.illumination}: choose one of {', '.join(ILLUMINATION)}.")
        if not self.channels:
            raise CellmorphError("no channels to prepare; name them with --channels (e.g. --channels DNA,ER,RNA,AGP,Mito).")
        if min(self.grid) < 1:
            raise CellmorphError(f"--crops {self.grid[0]}x{self.grid[1]}: rows and columns must be at least 1 (1x1: the whole field).")

    def describe(self) -> str:
        steps = ["Anscombe 2*sqrt(x+3/8)"]
        if self.illumination == "plate":
            steps.insert(0, "illumination correction per plate and channel (mean field, Gaussian-smoothed, robust minimum 1)")
        if self.square_fields:
            steps.insert(0, "fields area-resized to square")
        if self.normalise == "controls":
            steps.append("z-score per plate and channel by all control pixels")
        steps.append("per-field min-max to 0-255 (all channels), truncated to uint8")
        if self.zero_channel:
            steps.append("a zero channel first")
        steps.append(f"{self.grid[0]}x{self.grid[1]} crops")
        if self.drop_empty:
            steps.append(f"crops with <= {EMPTY_FRACTION:.1%} of values > {EMPTY_LEVEL:.1f} dropped")
        if self.image_size:
            steps.append(f"crops resized to {self.image_size}x{self.image_size}")
        return "; ".join(steps)


# --- one field -------------------------------------------------------------------------------------------------


def _dtype(bit_depth: int):
    return {8: np.uint8, 16: np.uint16, 0: None}[bit_depth]


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize one integer plane to (height, width), keeping its dtype (the paper's cv2.INTER_AREA)."""
    from PIL import Image

    if plane.shape == size:
        return plane
    out = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size[1], size[0]), Image.Resampling.BOX))
    info = np.iinfo(plane.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)


def read_plate_field(paths: list[str], settings: PlateSettings, illum: np.ndarray | None = None) -> np.ndarray:
    """One field's channel files -> C x H x W unsigned ints, squared and illumination-corrected as the settings say."""
    field = read_raw_field(paths, list(settings.channels), dtype=_dtype(settings.bit_depth))
    if settings.square_fields:
        field = np.stack([resize_plane(p, (field.shape[1], field.shape[1])) for p in field])
    if illum is not None:
        info = np.iinfo(field.dtype)
        field = np.clip(np.rint(field / illum), 0, info.max).astype(field.dtype)
    return field


def field_crops(field: np.ndarray, settings: PlateSettings, ztab: np.ndarray | None) -> tuple[list[np.ndarray], list[bool]]:
    """A raw field -> its uint8 crops and, per crop, whether it is kept. ztab: the plate's control z-score tables
    (normalise = "controls"), or None: the Anscombe transform alone, so the per-field min-max does the rest."""
    if ztab is None:
        levels = levels_of(field.dtype)
        ztab = np.broadcast_to(anscombe_table(levels), (field.shape[0], levels))
    crops, kept = normalize_field(field, ztab, settings.grid)
    if not settings.drop_empty:
        kept = [True] * len(crops)
    if settings.zero_channel:
        crops = [np.concatenate([np.zeros_like(c[:1]), c]) for c in crops]
    if settings.image_size:
        crops = [resize_uint8(c.transpose(1, 2, 0), settings.image_size).transpose(2, 0, 1) for c in crops]
    return crops, kept


def levels_of(dtype) -> int:
    """The number of possible raw values: 256 for 8-bit files, 65,536 for 16-bit ones."""
    return 256 if np.dtype(dtype) == np.uint8 else 65536


# --- per plate -------------------------------------------------------------------------------------------------


def illumination_function(paths: list[list[str]], settings: PlateSettings, pool: ThreadPoolExecutor, workers: int) -> np.ndarray:
    """C x H x W float64: per channel the mean of the plate's fields, Gaussian-smoothed, scaled to a robust minimum of 1."""
    from scipy.ndimage import gaussian_filter

    total = None
    for chunk in chunks(paths, 4 * workers):
        for field in pool.map(lambda ps: read_plate_field(ps, settings), chunk):  # no illum given: uncorrected
            total = field.astype(np.float64) if total is None else total + field
    mean = total / len(paths)
    sigma = max(1.0, min(mean.shape[1:]) / 20)
    out = np.stack([gaussian_filter(m, sigma, mode="nearest") for m in mean])
    for c in range(out.shape[0]):
        low = np.percentile(out[c], 2)
        if not low > 0:
            raise CellmorphError(f"the illumination function of channel {settings.channels[c]} is zero somewhere (all fields dark there); "
                                 "prepare without --illumination.")
        out[c] /= low
    return out


def control_stats(paths: list[list[str]], settings: PlateSettings, illum, pool, workers: int, on_field=None) -> tuple[list[tuple[float, float]], int]:
    """Per channel (mean, std) of the Anscombe-transformed pixels of the given control fields (exact, streaming), and
    the number of raw levels (256 or 65,536) they were counted over."""
    levels = None

    def hist(ps):
        field = read_plate_field(ps, settings, illum)
        return field.dtype, np.stack([pixel_histogram(field[c], levels_of(field.dtype)) for c in range(field.shape[0])])

    total = None
    for chunk in chunks(paths, 4 * workers):  # at most 4 fields per worker in flight
        for dtype, h in pool.map(hist, chunk):
            if levels is not None and levels_of(dtype) != levels:
                raise CellmorphError(f"the control fields of one plate mix 8- and 16-bit files (e.g. {chunk[0][0]}); convert them to one bit depth.")
            levels = levels_of(dtype)
            total = h if total is None else total + h
            if on_field:
                on_field()
    return [anscombe_stats(total[c]) for c in range(total.shape[0])], levels


# --- finished plates, kept until the store is complete (a killed prepare resumes plate by plate) ------------------

SEGMENT_FILES = {"crops.bin", "rows.parquet", "plate.json"}  # plate.json last: marks a segment complete


def plate_key(pf: pd.DataFrame, path_cols: list[str], settings: PlateSettings, dataset: str) -> str:
    """What a plate's prepared crops depend on: the settings, its rows' metadata, and each file's path, size and mtime."""
    h = hashlib.sha256(json.dumps({"dataset": dataset, **settings.__dict__}, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(pf.drop(columns=path_cols).astype(str), index=False).to_numpy().tobytes())
    for p in pf[path_cols].astype(str).to_numpy().ravel():
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:  # an OME-Zarr reference, or a missing file (named when it is read)
            h.update(f"{p}\n".encode())
    return h.hexdigest()[:20]


def segments_folder(out: Path) -> Path:
    """Where the finished plates of a prepare into `out` wait until the store is complete (in the cache, keyed by
    the absolute --out): a killed prepare's next run takes them instead of preparing those plates again."""
    return cache_dir() / "prepare" / hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]


def read_segment(folder: Path) -> tuple[np.ndarray, pd.DataFrame, dict] | None:
    """A finished plate's crops (memory-mapped), rows and summary; None when absent, unfinished or damaged."""
    try:
        info = json.loads((folder / "plate.json").read_text())
        rows = pd.read_parquet(folder / "rows.parquet")
        n = info["crops_kept"]
        crops = np.memmap(folder / "crops.bin", dtype=np.uint8, mode="r", shape=(n, *info["crop_shape"])) if n else np.zeros((0,), np.uint8)
    except (OSError, ValueError, KeyError):
        return None
    if len(rows) != n or (n and crops.size != (folder / "crops.bin").stat().st_size):
        return None
    return crops, rows, info


class SegmentWriter:
    """One plate's kept crops (appended to crops.bin as they come) and rows; `finish` writes rows.parquet and plate.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        remove_own_folder(folder, SEGMENT_FILES)  # an unfinished one from a killed run
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / "crops.bin", "wb")
        self.rows: list[dict] = []

    def add(self, crop: np.ndarray, row: dict) -> None:
        self.file.write(np.ascontiguousarray(crop).tobytes())
        self.rows.append(row)

    def finish(self, info: dict) -> None:
        self.file.close()
        write_parquet(self.folder / "rows.parquet", pd.DataFrame(self.rows), "cache")
        write_json(self.folder / "plate.json", info, "cache")

    def close(self) -> None:
        self.file.close()


def prepare_plate(fields: pd.DataFrame, out: Path, settings: PlateSettings, dataset: str = "plate", workers: int | None = None,
                  extra: dict | None = None) -> dict:
    """Raw plate fields -> a prepared store in `out` (replaced only once complete). Returns prepared.json's content.

    `fields`: one row per field, `Image_Path_<Channel>` for each of settings.channels, Metadata_Plate, Metadata_Well,
    and Metadata_Role ("control"/"treatment") when settings.normalise == "controls"."""
    channels = list(settings.channels)
    path_cols = [f"Image_Path_{c}" for c in channels]
    missing = [c for c in path_cols if c not in fields.columns]
    if missing:
        have = [c.removeprefix("Image_Path_") for c in fields.columns if c.startswith("Image_Path_")]
        raise CellmorphError(f"channel(s) {[m.removeprefix('Image_Path_') for m in missing]} are not in the image table (channels there: {have}).")
    by_controls = settings.normalise == "controls"
    if by_controls:
        if ROLE not in fields.columns:
            raise CellmorphError("normalising by controls needs the control wells: give a plate map with the control compound (--controls).")
        fields = fields[fields["Metadata_Plate"].isin(fields.loc[fields[ROLE] == "treatment", "Metadata_Plate"])]
        written = fields if settings.include_controls else fields[fields[ROLE] == "treatment"]
    else:
        written = fields
    if written.empty:
        raise CellmorphError("no treatment fields to prepare (every field is a control well?). Check the plate map and --controls.")
    workers = workers or os.cpu_count() or 1
    meta_cols = [c for c in fields.columns if c.startswith("Metadata_") and c != ROLE]
    n_crops = settings.grid[0] * settings.grid[1]
    per_plate, dropped, resumed = {}, [], []
    first_crops = None
    writer = None
    segments = segments_folder(out)
    try:
        with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
            task = progress.add_task(f"preparing {dataset}", total=len(fields))
            for plate, pf in fields.groupby("Metadata_Plate", sort=True):
                seg_dir = segments / plate_key(pf, path_cols, settings, dataset)
                done = read_segment(seg_dir)
                if done is not None:  # prepared by an earlier, killed run: its crops as they were
                    crops_done, rows_done, info = done
                    if writer is not None and tuple(info["field_shape"]) != first_crops[0]:
                        raise CellmorphError(f"plate {plate}: field size {info['field_shape'][1:]} differs from the first field's "
                                             f"{list(first_crops[0][1:])}; prepare plates of one field size together.")
                    if writer is None:
                        first_crops = (tuple(info["field_shape"]), tuple(info["crop_shape"]))
                        writer = StoreWriter(Path(out), len(written) * n_crops, first_crops[1])
                    for crop, row in zip(crops_done, rows_done.to_dict("records")):
                        writer.add(np.asarray(crop), row)
                    per_plate[plate], resumed = info["summary"], resumed + [plate]
                    dropped += info["dropped"]
                    progress.advance(task, len(pf))
                    continue
                illum = None
                if settings.illumination == "plate":
                    progress.update(task, description=f"{plate}: illumination")
                    illum = illumination_function(pf[path_cols].values.tolist(), settings, pool, workers)
                ztab, stats = None, None
                if by_controls:
                    progress.update(task, description=f"{plate}: control statistics")
                    controls = pf[pf[ROLE] == "control"]
                    stats, levels = control_stats(controls[path_cols].values.tolist(), settings, illum, pool, workers, lambda: progress.advance(task))
                    for ch, (_, s) in zip(channels, stats):
                        if not s > 0:
                            raise CellmorphError(f"plate {plate}: the control fields' {ch} channel is constant (std 0); check those files.")
                    ztab = zscore_tables([m for m, _ in stats], [s for _, s in stats], levels)
                progress.update(task, description=f"{plate}: fields")
                tf = pf[pf.index.isin(written.index)]

                def work(ps):
                    field = read_plate_field(ps, settings, illum)
                    if ztab is not None and levels_of(field.dtype) != ztab.shape[1]:
                        raise CellmorphError(f"{ps[0]}: {field.dtype.name} pixels, but the plate's control fields are "
                                             f"{'8' if ztab.shape[1] == 256 else '16'}-bit; one plate needs one bit depth.")
                    return field.shape, field_crops(field, settings, ztab)

                rows = tf[meta_cols].to_dict("records")
                kept_n, plate_dropped = 0, []
                segment = SegmentWriter(seg_dir)
                for chunk_rows, chunk_paths in zip(chunks(rows, 4 * workers), chunks(tf[path_cols].values.tolist(), 4 * workers)):
                    for row, (shape, (crops, kept)) in zip(chunk_rows, pool.map(work, chunk_paths)):
                        if writer is None:
                            first_crops = (shape, crops[0].shape)
                            writer = StoreWriter(Path(out), len(written) * n_crops, crops[0].shape)
                        elif shape != first_crops[0]:
                            raise CellmorphError(f"plate {plate} well {row.get('Metadata_Well')}: field size {shape[1:]} differs from the first field's "
                                                 f"{first_crops[0][1:]}; prepare plates of one field size together.")
                        for k, (crop, keep) in enumerate(zip(crops, kept), start=1):
                            if not keep:
                                plate_dropped.append(f"{row['Metadata_Plate']}/{row['Metadata_Well']}/s{row.get('Metadata_Site', '')}/crop{k}")
                                continue
                            writer.add(crop, {**row, "Metadata_Crop": k})
                            segment.add(crop, {**row, "Metadata_Crop": k})
                            kept_n += 1
                        progress.advance(task)
                per_plate[plate] = {"fields": len(tf), "crops_kept": kept_n}
                if by_controls:
                    per_plate[plate].update({
                        "control_fields": int((pf[ROLE] == "control").sum()),
                        "control_anscombe_mean": dict(zip(channels, [round(m, 6) for m, _ in stats])),
                        "control_anscombe_std": dict(zip(channels, [round(s, 6) for _, s in stats])),
                    })
                dropped += plate_dropped
                segment.finish({"summary": per_plate[plate], "dropped": plate_dropped, "crops_kept": kept_n,
                                "field_shape": list(first_crops[0]), "crop_shape": list(first_crops[1])})
        recipe = {
            "dataset": dataset,
            "channels": (["zero"] if settings.zero_channel else []) + channels,
            "preprocessing": settings.describe(),
            "settings": {**settings.__dict__, "channels": channels, "grid": list(settings.grid)},
            "image_size": settings.image_size,
            "plates": per_plate,
            "crops_dropped": dropped,
            **(extra or {}),
        }
        if resumed:
            recipe["resumed_plates"] = resumed
        writer.finish(recipe)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    for folder in sorted(segments.glob("*")):  # the store is complete: the finished plates' copies go
        remove_own_folder(folder, SEGMENT_FILES)
    if segments.is_dir() and not any(segments.iterdir()):
        segments.rmdir()
    if resumed:
        console.print(f"resumed: {len(resumed)} plate(s) prepared by an earlier run taken as they were ({', '.join(map(str, resumed[:5]))})")
    return load_recipe(out)

