"""BBBC013 (Ilya Ravkin): FKHR-GFP cytoplasm-to-nucleus translocation in U2OS cells, one 96-well plate.

Layout under the data folder (the Broad's, as the CellProfiler example images lay it out):

    bbbc013/1049_Metadata.csv        ImageNumber, Column (01-12), Row (A-H), SBS_Doses (0-10), SBS_Controls
    bbbc013/Channel1-NN-R-CC.tif     GFP (the translocating reporter), 640x640, 8-bit
    bbbc013/Channel2-NN-R-CC.tif     DNA (Hoechst)

SBS_Doses is a dose *index* (0 = no drug, 10 = the positive control's dose); SBS_Controls is -1 for
negative control wells, 1 for positive control wells, 0 for the dose series. Note that the controls'
columns differ between halves of the plate (rows A-D: columns 01-02 negative, 12 positive; rows E-H:
column 01 positive, 02 and 12 negative): cellmorph reads them from the metadata, never from positions.

Labels as Kensert et al. (2019) for the translocation experiment: the 4 highest dose indices (7-10)
"translocated", the 4 lowest (0-3, including the untreated wells) "not translocated", the middle doses
(4-6) "middle" (kept for the dose-response view, never trained or scored). Cross-validation: 2 folds of
independent wells, plate rows A-D vs E-H (the two halves carry separate dose series).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellmorph.data.datasets.translocation import MIDDLE, NEGATIVE, POSITIVE  # noqa: F401  (MIDDLE: used by importers)
from cellmorph.data.registry import register, register_prepare
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

FOLDER = "bbbc013"
METADATA = "1049_Metadata.csv"
CHANNELS = ("GFP", "DNA")  # Channel1, Channel2
LABEL = "Metadata_Translocation"


def translocation_label(dose_rank: pd.Series, n_levels: int) -> pd.Series:
    """The 4 highest of `n_levels` dose levels (ranks 0..n-1) positive, the 4 lowest negative, the rest middle."""
    out = pd.Series(MIDDLE, index=dose_rank.index)
    out[dose_rank >= n_levels - 4] = POSITIVE
    out[dose_rank <= 3] = NEGATIVE
    return out


@register("bbbc013", "BBBC013 FKHR-GFP translocation, one 96-well plate, GFP + DNA (prepare it: `cellmorph prepare bbbc013`)")
def load_bbbc013(data_dir: Path, label: str = LABEL, crops_per_well: int = 0) -> ImageTable:
    """The plate's wells (crops_per_well = 0), or the paper's training unit: the first `crops_per_well`
    of the 16 crops of each well (prepared once into the cache), middle doses unlabelled."""
    label = LABEL if label == "Metadata_MoA" else label  # the config default names the MoA column; here it is the translocation label
    if crops_per_well:
        return _crops_table(data_dir, label, crops_per_well)
    root = Path(data_dir) / FOLDER
    if not (root / METADATA).is_file() and (Path(data_dir) / METADATA).is_file():
        root = Path(data_dir)
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise CellmorphError(f"{meta_path}: BBBC013 metadata not found. Point --data at the folder holding {FOLDER}/.")
    try:
        meta = pd.read_csv(meta_path, dtype={"Column": str, "Row": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CellmorphError(f"{meta_path}: cannot be read as CSV ({err}).") from None
    need = ["ImageNumber", "Column", "Row", "SBS_Doses", "SBS_Controls"]
    if missing := [c for c in need if c not in meta.columns]:
        raise CellmorphError(f"{meta_path}: missing column(s) {missing}; expected {need}.")
    col = meta["Column"].astype(int)
    row = meta["Row"].astype(str).str.upper()
    dose = meta["SBS_Doses"].astype(int)
    df = pd.DataFrame(
        {
            "Metadata_Plate": "BBBC013",
            "Metadata_Well": row + col.map("{:02d}".format),
            "Metadata_Row": row,
            "Metadata_Column": col,
            "Metadata_Site": 1,
            # The metadata file gives dose indices, not the drugs; each half of the plate is one dose series.
            "Metadata_Compound": row.map(lambda r: "series A-D" if r in "ABCD" else "series E-H"),
            "Metadata_Concentration": dose.astype(float),
            "Metadata_Dose": dose,
            "Metadata_Control": meta["SBS_Controls"].astype(int).map({-1: "negative", 0: "dose series", 1: "positive"}),
            "Metadata_Fold": row.map(lambda r: 0 if r in "ABCD" else 1),
            LABEL: translocation_label(dose, 11),
        }
    )
    n = meta["ImageNumber"].astype(int)
    for i, ch in enumerate(CHANNELS, start=1):
        df[f"Image_Path_{ch}"] = [str(root / f"Channel{i}-{k:02d}-{r}-{c:02d}.tif") for k, r, c in zip(n, row, col)]
    table = ImageTable(df, name="bbbc013", label=label, source=str(meta_path))
    table.check_files_exist()
    return table


def _crops_table(data_dir: Path, label: str, crops_per_well: int) -> ImageTable:
    from cellmorph.data.datasets.translocation import crops_store, translocation_labels

    if not 1 <= crops_per_well <= 16:
        raise CellmorphError(f"dataset.options.crops_per_well = {crops_per_well}: choose 1 to 16 (each well is cut into 4 x 4 crops).")
    folder = crops_store("bbbc013", data_dir, crops_per_well)
    index = pd.read_parquet(folder / "index.parquet")
    index[label] = translocation_labels(index[label])
    return ImageTable(index, name=f"bbbc013-crops{crops_per_well}", label=label, source=str(folder / "index.parquet"), store_dir=str(folder))


def _prepare_bbbc013(data_dir: Path, out: Path, workers: int | None = None) -> dict:
    from cellmorph.data.datasets.translocation import prepare_translocation

    return prepare_translocation("bbbc013", data_dir, out, workers=workers)


register_prepare("bbbc013", _prepare_bbbc013)
