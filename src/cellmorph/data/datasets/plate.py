"""`cellmorph prepare plate`: a scientist's own raw plate(s) through the paper's preprocessing (cellmorph.data.plates).

Input: the image table as CellProfiler writes it, a LoadData CSV (`Image_FileName_<Ch>`, `Image_PathName_<Ch>`,
`Metadata_Plate`, `Metadata_Well`, `Metadata_Site`) or a folder-format CSV (`Image_Path_<Ch>`), one raw 8- or 16-bit
single-channel file per channel; and a plate map (well -> compound, concentration, label...; data/platemap.py)
unless the image table already holds those columns. Any number of channels; --channels picks and orders them.

    cellmorph prepare plate --images load_data.csv --platemap platemap.csv \\
        --channels DNA,ER,RNA,AGP,Mito --controls DMSO --crops 1x1 --image-size 224 --out my_plate_store

then train on it with `[dataset] name = "prepared"` and `options = {path = "my_plate_store"}`.
"""

from __future__ import annotations

from pathlib import Path

from cellmorph.data.inputs import read_images
from cellmorph.data.platemap import PLATE, WELL, join_platemap, mark_controls
from cellmorph.data.plates import PlateSettings, prepare_plate
from cellmorph.data.registry import register_prepare
from cellmorph.data.table import PATH_PREFIX
from cellmorph.errors import CellmorphError


def parse_grid(text: str) -> tuple[int, int]:
    """'2x2' -> (2, 2); '1x1' is the whole field."""
    try:
        rows, cols = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise CellmorphError(f"--crops {text}: write ROWSxCOLUMNS, e.g. 2x2 (4 crops per field) or 1x1 (whole fields).") from None
    return rows, cols


def plate_fields(images: str | Path, platemap: str | Path | None = None, controls: str = "DMSO",
                 control_column: str = "Metadata_Compound", by_controls: bool = True):
    """The fields of the image table with the plate map joined and Metadata_Role set (when normalising by controls)."""
    table = read_images(images, label="Metadata_MoA")
    fields = table.df
    missing = [c for c in (PLATE, WELL) if c not in fields.columns]
    if missing:
        raise CellmorphError(f"{images}: no {' or '.join(missing)} column; a plate's image table names each field's plate and well "
                             f"({PLATE}, {WELL}, as CellProfiler's LoadData does).")
    if platemap is not None:
        fields = join_platemap(fields, platemap)
    if by_controls:
        fields = mark_controls(fields, controls, control_column, source=str(platemap or images))
    return fields


def prepare_plate_command(data_dir: Path | None, out: Path, images_root: Path | None = None, platemap: Path | None = None,
                          channels: list[str] | None = None, controls: str = "DMSO", control_column: str = "Metadata_Compound",
                          normalise: str = "controls", crops: str = "2x2", keep_empty: bool = False, include_controls: bool = False,
                          illumination: str = "none", image_size: int = 0, workers: int | None = None) -> dict:
    """`cellmorph prepare plate`: --images (the LoadData or folder CSV) + --platemap -> a prepared store in `out`."""
    if images_root is None:
        raise CellmorphError("cellmorph prepare plate needs --images: the plate's LoadData CSV (or folder-format CSV).")
    PlateSettings(channels=("any",), normalise=normalise, illumination=illumination, grid=parse_grid(crops))  # bad settings: before reading
    fields = plate_fields(images_root, platemap, controls, control_column, by_controls=normalise == "controls")
    have = [c.removeprefix(PATH_PREFIX) for c in fields.columns if c.startswith(PATH_PREFIX)]
    chosen = list(channels) if channels else have
    unknown = [c for c in chosen if c not in have]
    if unknown:
        raise CellmorphError(f"--channels: {unknown} not in {images_root} (its channels: {have}).")
    settings = PlateSettings(channels=tuple(chosen), normalise=normalise, grid=parse_grid(crops), drop_empty=not keep_empty,
                             image_size=image_size, illumination=illumination, include_controls=include_controls)
    extra = {"images": str(images_root), "platemap": str(platemap) if platemap else None, "controls": f"{control_column} = {controls}"}
    return prepare_plate(fields, Path(out), settings, dataset="plate", workers=workers, extra=extra)


register_prepare("plate", prepare_plate_command)
