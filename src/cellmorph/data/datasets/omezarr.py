"""An OME-Zarr HCS plate (ome-zarr-py's layout: plate / row / column / field) with a plate map, as a dataset.

    [dataset]
    name = "omezarr"
    label = "Metadata_MoA"                                         # default
    options = {path = "screen/plate1.zarr", platemap = "screen/platemap.csv"}   # relative to the data folder

One row per field (Metadata_Plate, Metadata_Well, Metadata_Site, Image_Path_<Channel> image references, see
cellmorph.data.omezarr), joined on the well with the plate map (cellmorph.data.platemap: one row per well,
Metadata_Well and any Metadata_* columns: compound, concentration, the label). A well with images but no row in the
map is an error; a well whose label is empty is predicted, not trained on or scored. Without a plate map the fields
carry no label: load them with label=None to predict.
"""

from __future__ import annotations

from pathlib import Path

from cellmorph.data.omezarr import plate_fields
from cellmorph.data.platemap import join_platemap
from cellmorph.data.registry import is_absolute_option, register
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

DEFAULT_LABEL = "Metadata_MoA"


def _resolve(data_dir: Path | None, value: str, option: str) -> Path:
    given = Path(value).expanduser()
    if given.is_absolute():
        return given
    if data_dir is None:
        raise CellmorphError(f"dataset.options.{option} = '{value}' is relative to the data folder, and none is given: pass --data DIR "
                             "(or set CELLMORPH_DATA), or give an absolute path.")
    return Path(data_dir) / given


@register("omezarr", "an OME-Zarr HCS plate (PLATE.zarr, as ome-zarr-py writes it) with a plate map CSV (options: path, platemap)",
          needs_no_data=is_absolute_option("path"))
def load_omezarr(data_dir: Path | None, path: str | None = None, platemap: str | None = None, label: str | None = None) -> ImageTable:
    """The plate's fields joined with the plate map. label None (the API's load_dataset without label=): Metadata_MoA
    when the map has it, else the table loads without labels (new images to predict).

    Example:
        >>> load_omezarr(None, path="/data/plate1.zarr", platemap="/data/platemap.csv").df["Metadata_Well"].iloc[0]
        'B03'"""
    if path is None:
        raise CellmorphError('dataset \'omezarr\' needs dataset.options = {path = "PLATE.zarr", platemap = "platemap.csv"} in the config.')
    plate = _resolve(data_dir, path, "path")
    df = plate_fields(plate)
    if platemap is not None:
        df = join_platemap(df, _resolve(data_dir, platemap, "platemap"))
    name = label or DEFAULT_LABEL
    needs_label = label is not None or name in df.columns
    if needs_label and name not in df.columns:
        where = f"the plate map {platemap}" if platemap else "no plate map (dataset.options.platemap)"
        raise CellmorphError(f"{plate}: no label column {name} ({where}). Give a plate map CSV with a {name} column per well, "
                             "or set dataset.label to the map's label column.")
    table = ImageTable(df, name=f"omezarr:{plate.name}", label=name, source=str(plate), required=(), needs_label=needs_label)
    table.check_files_exist()
    return table
