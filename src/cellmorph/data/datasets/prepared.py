"""A store written by `cellmorph prepare` (e.g. raw BBBC021 after the paper's preprocessing), as a dataset.

    [dataset]
    name = "prepared"
    options = {path = "bbbc021-prepared"}    # relative to the data folder, or absolute

The folder holds images.npy (uint8 N x C x H x W), index.parquet (one row per image, Metadata_*
columns) and prepared.json (how it was made). Training reads the images from there unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellmorph.data.registry import is_absolute_option, register
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError


@register("prepared", "a store made by `cellmorph prepare` (option: path, the folder given to --out)", needs_no_data=is_absolute_option("path"))
def load_prepared(data_dir: Path | None, path: str | None = None, label: str = "Metadata_MoA") -> ImageTable:
    if path is None:
        raise CellmorphError("dataset 'prepared' needs dataset.options = {path = \"FOLDER\"}: the --out folder of `cellmorph prepare`.")
    folder = Path(path).expanduser()
    folder = folder if folder.is_absolute() else Path(data_dir) / folder
    index = folder / "index.parquet"
    if not index.is_file() or not (folder / "images.npy").is_file():
        raise CellmorphError(f"{folder}: no prepared store there (images.npy + index.parquet). Run `cellmorph prepare NAME --out {folder}` first.")
    return ImageTable(pd.read_parquet(index), name=f"prepared:{folder.name}", label=label, source=str(index), store_dir=str(folder))
