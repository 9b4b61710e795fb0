"""Translocation plates (Kensert et al. 2019, Fig 4; BBBC013/BBBC014): the raw plate's preparation (16 crops
per well), the crops store in the cache, and the labels. (The screener's dose-response view is
cellmorph.reporting.doseresponse.)

The experiment is a config of `cellmorph run` (configs/translocation/*.toml): the plate's 16 crops per
well (`dataset.options = {crops_per_well = 16}`), the 4 highest doses "translocated" and the 4 lowest
"not translocated", the middle doses unlabelled (predicted, never trained on or scored); predefined
folds over Metadata_Fold (BBBC013: plate rows A-D vs E-H); a well's probability is the mean over its
crops (`evaluation.aggregate = "mean"`, the well level is the paper's per-image accuracy); replicates
are `seeds`; accuracy after chosen epochs (`finetune.eval_epochs`). `outputs = ["dose_response"]`
adds, from this module: wells.csv's dose-response fit (4-parameter logistic) and Z'-factor per dose
series (dose_response.json, dose_response.png) and the Fig-4-like plot of per-replicate accuracy
after each evaluated epoch (fig4.png).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.prepare import StoreWriter, load_recipe, read_raw_field
from cellmorph.data.preprocess import anscombe_minmax_uint8, read_image, tile_boxes
from cellmorph.data.registry import load_registered
from cellmorph.data.store import cache_dir, open_prepared, store_key
from cellmorph.errors import CellmorphError
from cellmorph.io import write_json, write_npy, write_parquet
from cellmorph.progress import make_progress

POSITIVE, NEGATIVE, MIDDLE = "translocated", "not translocated", "middle"


def crops_store(name: str, data_dir: Path, crops_per_well: int) -> Path:
    """The folder of a prepared store of the plate's crops (the first `crops_per_well` of each well's
    16), prepared once into the cache (keyed by the files) and reused."""
    table = load_registered(name, data_dir)
    full = cache_dir() / "prepared" / f"{name}-{store_key(table, 0)}"
    if not (full / "prepared.json").is_file():
        prepare_translocation(name, data_dir, full)
    if crops_per_well >= 16:
        return full
    sub = full.parent / f"{full.name}-crops{crops_per_well}"
    if not (sub / "prepared.json").is_file():
        store = open_prepared(full, mmap=True)
        keep = np.flatnonzero(store.index["Metadata_Crop"].to_numpy() <= crops_per_well)
        write_npy(sub / "images.npy", np.ascontiguousarray(store.images[keep]))
        write_parquet(sub / "index.parquet", store.index.iloc[keep].reset_index(drop=True))
        recipe = json.loads((full / "prepared.json").read_text())
        write_json(sub / "prepared.json", {**recipe, "crops_per_well": crops_per_well})  # last: marks it complete
    return sub


def translocation_labels(labels: pd.Series) -> pd.Series:
    """The training label: translocated / not translocated; middle doses become unlabelled ("")."""
    lab = labels.astype(str)
    return lab.where(lab.isin([POSITIVE, NEGATIVE]), "")


def _resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize one integer plane to (height, width), keeping its dtype (the paper's cv2.INTER_AREA)."""
    from PIL import Image

    if plane.shape == size:
        return plane
    out = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size[1], size[0]), Image.Resampling.BOX))
    info = np.iinfo(plane.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)


def translocation_crops(field: np.ndarray, grid: tuple[int, int] = (4, 4), resize: tuple[int, int] | str | None = None) -> list[np.ndarray]:
    """2 x H x W raw field (reporter, nuclei) -> 16 uint8 crops of (0, reporter, nuclei)."""
    if resize == "square":  # BBBC014: 1360 x 1024 -> 1024 x 1024, as the paper
        resize = (field.shape[1], field.shape[1])
    if resize is not None:
        field = np.stack([_resize_plane(p, resize) for p in field])
    img = anscombe_minmax_uint8(field)
    img = np.concatenate([np.zeros_like(img[:1]), img])
    return [img[:, t : t + h, l : l + w] for t, l, h, w in tile_boxes(img.shape[1], img.shape[2], grid)]


def prepare_translocation(name: str, data_dir: Path, out: Path, workers: int | None = None) -> dict:
    table = load_registered(name, data_dir)
    df = table.df
    channels = [c.removeprefix("Image_Path_") for c in table.path_columns]
    resize = "square" if name == "bbbc014" else None
    grid = (4, 4)

    def work(ps):
        planes = []
        for p, ch in zip(ps, channels):
            arr = read_image(p)
            if arr.dtype not in (np.uint8, np.uint16):
                raise CellmorphError(f"{p}: expected an 8- or 16-bit image ({ch}), got {arr.dtype}.")
            planes.append(read_raw_field([p], [ch], dtype=arr.dtype)[0])
        if len({p.shape for p in planes}) > 1 or len({p.dtype for p in planes}) > 1:
            raise CellmorphError(f"the channel files of one well differ in size or bit depth: {ps}")
        return translocation_crops(np.stack(planes), grid, resize)

    paths = df[table.path_columns].values.tolist()
    first = work(paths[0])
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    writer = StoreWriter(Path(out), len(df) * 16, first[0].shape)
    try:
        with make_progress() as progress, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            task = progress.add_task(f"preparing {name}", total=len(df))
            for row, crops in zip(df[meta_cols].to_dict("records"), pool.map(work, paths)):
                for k, crop in enumerate(crops, start=1):
                    writer.add(crop, {**row, "Metadata_Crop": k})
                progress.advance(task)
        recipe = {
            "dataset": name,
            "channels": ["zero", *channels],
            "preprocessing": "2 channels + a zero channel; Anscombe 2*sqrt(x+3/8); per-field min-max to 0-255 (both channels), "
            "truncated to uint8; 4x4 = 16 crops" + ("; fields first area-resized to square (1360x1024 -> 1024x1024)" if resize else ""),
            "label_column": table.label,
        }
        writer.finish(recipe)
    except BaseException:
        writer.abort()
        raise
    return load_recipe(out)


