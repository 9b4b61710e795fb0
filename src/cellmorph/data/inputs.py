"""The images `cellmorph predict` reads: a folder-format CSV (Image_Path_<Channel>), a CellProfiler LoadData
CSV (Image_FileName_/Image_PathName_<Channel>), an OME-Zarr HCS plate (PLATE.zarr) or a folder of image files, as an ImageTable that needs no
label; and the check of its channels and image size against the model's, before anything is decoded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.omezarr import plate_fields
from cellmorph.data.table import PATH_PREFIX, ImageTable
from cellmorph.errors import CellmorphError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LOADDATA_FILE, LOADDATA_PATH = "Image_FileName_", "Image_PathName_"


class NewImages(ImageTable):
    """An ImageTable of images to predict: image paths required, no label needed (kept when present)."""

    def validate(self) -> None:
        if self.store_dir is not None and len(self.df):
            return  # a prepared store: its images are in images.npy, one per index row
        if not self.path_columns:
            raise CellmorphError(
                f"{self.source}: no image column. Name one column per channel '{PATH_PREFIX}<Channel>' (folder format) "
                f"or give '{LOADDATA_FILE}<Channel>' and '{LOADDATA_PATH}<Channel>' (CellProfiler LoadData)."
            )
        if len(self.df) == 0:
            raise CellmorphError(f"{self.source}: the table has no rows; nothing to predict.")
        for col in self.path_columns:
            bad = self.df[col].isna() | (self.df[col].astype(str).str.strip() == "")
            if bad.any():
                raise CellmorphError(f"{self.source}: column '{col}' is empty in row(s) {list(self.df.index[bad][:5])}. Fill it in or drop those rows.")


def read_images(images: str | Path, label: str = "Metadata_MoA") -> NewImages:
    """The table of images to predict from a folder-format CSV, a CellProfiler LoadData CSV, an OME-Zarr HCS plate
    or a folder.

    Args:
        images: the CSV file, the plate's folder (a name ending in .zarr: cellmorph.data.omezarr.plate_fields) or the
            folder of image files.
        label: the bundle's label column: kept when the input has it (e.g. reference compounds), never needed.
    Returns:
        A `NewImages` table: Metadata_* and Image_Path_<Channel> columns (absolute paths), files checked.

    Example:
        >>> read_images("plate7/load_data.csv").path_columns
        ['Image_Path_DNA', 'Image_Path_Actin', 'Image_Path_Tubulin']
    """
    path = Path(images).expanduser()
    if path.is_dir() and (path / "prepared.json").is_file():  # a store made by `cellmorph prepare` (e.g. a new plate)
        if not (path / "images.npy").is_file() or not (path / "index.parquet").is_file():
            raise CellmorphError(f"{path}: a prepared store without images.npy or index.parquet; run `cellmorph prepare` for it again.")
        index = pd.read_parquet(path / "index.parquet")
        return NewImages(index, name=f"prepared:{path.resolve().name}", label=label, source=str(path), required=(), store_dir=str(path.resolve()))
    if path.suffix == ".zarr" and path.is_dir():
        return NewImages(plate_fields(path), name=f"images:{path.resolve()}", label=label, source=str(path), required=())
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CellmorphError(f"{path}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}). Pass a folder of images, or a CSV naming them.")
        df = pd.DataFrame({"Metadata_FileName": [f.name for f in files], f"{PATH_PREFIX}Image": [str(f.resolve()) for f in files]})
        table = NewImages(df, name=f"images:{path.resolve()}", label=label, source=str(path), required=())
        return table
    if not path.is_file():
        raise CellmorphError(f"{path}: not found. IMAGES is a CSV (folder format or CellProfiler LoadData) or a folder of image files.")
    try:
        with open(path, errors="replace") as f:
            header = f.readline()
        sep = ";" if header.count(";") > header.count(",") else ","  # comma, or semicolon as BBBC021's labels file
        df = pd.read_csv(path, sep=sep, dtype={label: str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, csv.Error) as err:
        raise CellmorphError(f"{path}: cannot be read as CSV ({err}).") from None
    df.columns = [str(c).strip() for c in df.columns]
    if not [c for c in df.columns if c.startswith(PATH_PREFIX)]:
        df = _from_loaddata(df, path)
    for col in [c for c in df.columns if c.startswith(PATH_PREFIX)]:
        df[col] = [p if pd.isna(p) else str(p if Path(str(p)).is_absolute() else path.parent / str(p)) for p in df[col]]
    table = NewImages(df, name=f"images:{path.resolve()}", label=label, source=str(path), required=())
    table.check_files_exist()
    return table


def _from_loaddata(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Image_FileName_<Ch> + Image_PathName_<Ch> -> Image_Path_<Ch> (CellProfiler's LoadData columns)."""
    names = [c for c in df.columns if c.startswith(LOADDATA_FILE)]
    if not names:
        raise CellmorphError(
            f"{path}: no image columns. Expected '{PATH_PREFIX}<Channel>' (folder format) or '{LOADDATA_FILE}<Channel>' with "
            f"'{LOADDATA_PATH}<Channel>' (CellProfiler LoadData); present: {list(df.columns)[:8]}."
        )
    out = df.drop(columns=[c for c in df.columns if c.startswith((LOADDATA_FILE, LOADDATA_PATH))])
    for c in names:
        channel = c.removeprefix(LOADDATA_FILE)
        folder = f"{LOADDATA_PATH}{channel}"
        if folder not in df.columns:
            raise CellmorphError(f"{path}: missing column '{folder}' for '{c}'. A LoadData CSV names each channel's folder beside its file name.")
        if df[folder].isna().any() or df[c].isna().any():
            rows = list(df.index[df[folder].isna() | df[c].isna()][:5])
            raise CellmorphError(f"{path}: column '{c}' or '{folder}' is empty in row(s) {rows}. Fill them in or drop those rows.")
        out[f"{PATH_PREFIX}{channel}"] = [str(Path(str(d)) / str(f)) for d, f in zip(df[folder], df[c])]
    return out


# --- checks against the model, before anything is decoded ---------------------------------------------


def match_channels(table: NewImages, clf) -> NewImages:
    """Put the input's channel columns in the training order (same names), and check the channel count and
    image size of the first row (the store checks every other row against it) against the model."""
    from cellmorph.data.preprocess import image_dtype, intensity_mapping, read_image

    if table.store_dir is not None:
        return _match_store(table, clf)
    if str(clf.trained_on.get("dataset", "")).startswith("prepared:"):
        raise CellmorphError(
            f"{table.source}: image files, but the model {clf.source} was trained on a store made by `cellmorph prepare` "
            f"({clf.trained_on['dataset'].removeprefix('prepared:')}), whose images went through the plate's preprocessing. Prepare the "
            "new plate the same way (`cellmorph prepare plate --images ... --out NEW_STORE` with the same settings) and predict NEW_STORE.")
    trained = list(clf.trained_on.get("channel_columns") or [])
    cols = table.path_columns
    if trained and set(cols) == set(trained) and cols != trained:
        other = [c for c in table.df.columns if c not in cols]
        table.df = table.df[other + trained]
    first = table.df.iloc[0]
    arrays = [(first[c], read_image(first[c])) for c in table.path_columns]
    channels = sum(a.shape[2] for _, a in arrays)
    files = ", ".join(str(p) for p, _ in arrays)
    if channels != clf.channels:
        names = f" ({', '.join(trained)})" if trained else ""
        raise CellmorphError(
            f"{files}: {channels} channel(s) per field of view ({', '.join(table.path_columns)}) but the model {clf.source} takes "
            f"{clf.channels}{names}. Give each field the model's channels in its order (one {PATH_PREFIX}<Channel> column per file)."
        )
    expected = clf.trained_on.get("source_dtypes") or {}
    if expected:  # the same pixels at another bit depth would be mapped to 0-255 differently (to_uint8)
        for (path, _), col, want in zip(arrays, table.path_columns, expected.values()):
            got = image_dtype(path)
            if got != want:
                raise CellmorphError(
                    f"{path}: {got} pixels, but the model {clf.source} was trained on {want} images ({col}: "
                    f"{intensity_mapping(want)}); {got} images would be mapped to 0-255 otherwise ({intensity_mapping(got)}). "
                    f"Give the images as the training images were ({want}), or train a model on {got} images.")
    shape = clf.trained_on.get("image_shape")
    size = clf.config.dataset.image_size
    h, w = arrays[0][1].shape[:2]
    if shape and not size and [h, w] != list(shape):
        raise CellmorphError(
            f"{arrays[0][0]}: {h}x{w} pixels but the model was trained on {shape[0]}x{shape[1]} images at their native size "
            f"(dataset.image_size = 0): cells would appear at another scale. Crop or resize the images to {shape[0]}x{shape[1]} as the "
            "training images were, or train with dataset.image_size set."
        )
    return table


# --- the prediction -----------------------------------------------------------------------------------


def _match_store(table: NewImages, clf) -> NewImages:
    """A prepared store against the model: its channels and image size (from images.npy's header)."""
    images = np.load(Path(table.store_dir) / "images.npy", mmap_mode="r")
    if images.shape[1] != clf.channels:
        raise CellmorphError(f"{table.store_dir}: {images.shape[1]} channel(s) per image but the model {clf.source} takes {clf.channels}. "
                             "Prepare the plate with the model's channels (--channels, in its order).")
    shape = clf.trained_on.get("image_shape")
    if shape and not clf.config.dataset.image_size and list(images.shape[2:]) != list(shape):
        raise CellmorphError(f"{table.store_dir}: images of {images.shape[2]}x{images.shape[3]} but the model was trained on {shape[0]}x{shape[1]} "
                             "at their native size. Prepare with the same --crops and --image-size as the training store.")
    return table
