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
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.plates import PlateSettings, field_crops, prepare_plate, resize_plane
from cellmorph.data.registry import load_registered
from cellmorph.data.store import cache_dir, open_prepared, store_key
from cellmorph.io import write_json, write_npy, write_parquet

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


def translocation_settings(name: str, channels: list[str]) -> PlateSettings:
    """The paper's translocation preprocessing as generic plate settings: each field's own Anscombe min-max, a zero
    channel first, 4 x 4 = 16 crops, none dropped (BBBC014's 1360 x 1024 fields first area-resized to 1024 x 1024)."""
    return PlateSettings(channels=tuple(channels), normalise="field", grid=(4, 4), drop_empty=False, zero_channel=True,
                         square_fields=name == "bbbc014")


def translocation_crops(field: np.ndarray, grid: tuple[int, int] = (4, 4), square: bool = False) -> list[np.ndarray]:
    """2 x H x W raw field (reporter, nuclei) -> 16 uint8 crops of (0, reporter, nuclei)."""
    settings = PlateSettings(channels=("reporter", "nuclei"), normalise="field", grid=grid, drop_empty=False, zero_channel=True)
    if square:  # BBBC014: 1360 x 1024 -> 1024 x 1024, as the paper
        field = np.stack([resize_plane(p, (field.shape[1], field.shape[1])) for p in field])
    return field_crops(field, settings, None)[0]


def prepare_translocation(name: str, data_dir: Path, out: Path, workers: int | None = None) -> dict:
    """The plate's wells -> a store of 16 crops each (the generic plate path with translocation_settings)."""
    table = load_registered(name, data_dir)
    channels = [c.removeprefix("Image_Path_") for c in table.path_columns]
    return prepare_plate(table.df, Path(out), translocation_settings(name, channels), dataset=name, workers=workers,
                         extra={"label_column": table.label})


