"""Bring your own images: one CSV with image path column(s), a label column and any Metadata_* columns.

    dataset.name = "folder"
    dataset.label = "Metadata_Label"                       # default Metadata_MoA
    dataset.options = {csv = "my_nuclei/patches.csv"}      # relative to the data folder

    Image_Path_HE,Metadata_Label,Metadata_Patient
    patches/p1_0001.png,tumour,P1
    patches/p1_0002.png,stroma,P1
    patches/p2_0001.png,,P2

One row per image, one column per image file named `Image_Path_<Channel>` (paths relative to the CSV's
folder, or absolute; each file 8- or 16-bit PNG/TIFF, grey or RGB; every row with the same channels).
Only the path column(s) and the label column are required (the label only for training: from Python,
`load_dataset("folder", csv=...)` without `label=` loads a CSV without Metadata_MoA as unlabelled images to
predict). The label and any grouping column must be Metadata_* columns: only those are carried into predictions,
metrics and models (a run refuses others before it starts). A worked example: docs/own-images.md. Every other column is optional and carried
through to the predictions: a drug screen adds Metadata_Plate, Metadata_Well, Metadata_Compound and
Metadata_Concentration (treatment-level results), a grouping column such as Metadata_Patient keeps a
patient's images together when the evaluation protocol groups by it.

A row with an empty label is predicted but not scored (e.g. the middle doses of a dose series), as
long as the labelled rows hold at least 2 classes. Spaces around a label are dropped; labels that differ
only in case or inner spaces, and a row repeated in every column, are errors (data/table.ImageTable).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellmorph.data.registry import is_absolute_option, register
from cellmorph.data.table import PATH_PREFIX, ImageTable
from cellmorph.errors import CellmorphError


DEFAULT_LABEL = "Metadata_MoA"


@register("folder", "your own images: a CSV with Image_Path_<Channel> columns, a label column and any Metadata_* columns (option: csv)",
          needs_no_data=is_absolute_option("csv"))
def load_folder(data_dir: Path | None, csv: str | None = None, label: str | None = None) -> ImageTable:
    """label None (the API's load_dataset without label=): Metadata_MoA when the CSV has that column, else the table
    loads without labels (new images to predict); a label named explicitly (a config's dataset.label) must exist."""
    if csv is None:
        raise CellmorphError("dataset 'folder' needs dataset.options = {csv = \"path/to/images.csv\"} in the config.")
    given = Path(csv).expanduser()
    if not given.is_absolute() and data_dir is None:
        raise CellmorphError(f"dataset.options.csv = '{csv}' is relative to the data folder, and none is given: pass --data DIR "
                             "(or set CELLMORPH_DATA), or give the CSV's absolute path.")
    csv_path = given if given.is_absolute() else Path(data_dir) / given
    if not csv_path.is_file():
        where = "an absolute path" if given.is_absolute() else f"relative to the data folder {data_dir}"
        raise CellmorphError(f"{csv_path}: CSV not found (dataset.options.csv, {where}).")
    name = label or DEFAULT_LABEL
    try:
        df = pd.read_csv(csv_path, dtype={name: str})  # labels 0/1 stay "0"/"1" even beside empty cells
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CellmorphError(f"{csv_path}: cannot be read as CSV ({err}).") from None
    for col in [c for c in df.columns if c.startswith(PATH_PREFIX)]:
        df[col] = [p if pd.isna(p) else str(p if Path(str(p)).is_absolute() else csv_path.parent / str(p)) for p in df[col]]
    needs_label = label is not None or name in df.columns
    table = ImageTable(df, name=f"folder:{csv_path.name}", label=name, source=str(csv_path), required=(), needs_label=needs_label)
    table.check_files_exist()
    return table
