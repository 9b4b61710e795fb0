"""Bring your own images: a CSV with image path column(s) and Metadata_* columns.

    dataset.name = "folder"
    dataset.options = {csv = "my_screen/images.csv"}    # relative to the data folder

The CSV has one row per field of view, one column per image file named `Image_Path_<Channel>`
(paths relative to the CSV's folder, or absolute; each file 8- or 16-bit PNG/TIFF, grey or RGB)
and the Metadata columns Metadata_Plate, Metadata_Well, Metadata_Compound,
Metadata_Concentration plus the label column (Metadata_MoA unless dataset.label says otherwise).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellmorph.datasets.registry import register
from cellmorph.datasets.table import PATH_PREFIX, ImageTable
from cellmorph.errors import CellmorphError


@register("folder", "your own images: a CSV with Image_Path_<Channel> and Metadata_* columns (option: csv)")
def load_folder(data_dir: Path, csv: str | None = None, label: str = "Metadata_MoA") -> ImageTable:
    if csv is None:
        raise CellmorphError("dataset 'folder' needs dataset.options = {csv = \"path/to/images.csv\"} in the config.")
    csv_path = Path(csv) if Path(csv).is_absolute() else Path(data_dir) / csv
    if not csv_path.is_file():
        raise CellmorphError(f"{csv_path}: CSV not found (dataset.options.csv, relative to the data folder {data_dir}).")
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CellmorphError(f"{csv_path}: cannot be read as CSV ({err}).") from None
    for col in [c for c in df.columns if c.startswith(PATH_PREFIX)]:
        df[col] = [str(p if Path(p).is_absolute() else (csv_path.parent / p)) for p in df[col].astype(str)]
    table = ImageTable(df, name=f"folder:{csv_path.name}", label=label, source=str(csv_path))
    table.check_files_exist()
    return table
