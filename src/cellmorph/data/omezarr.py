"""OME-Zarr HCS plates (OME-NGFF plate / row / column / field groups, as ome-zarr-py writes them) as images.

One channel of one field is named by an image reference, a string that stands wherever an image file path
stands (an ImageTable's `Image_Path_<Channel>` cell, `read_image`, `image_dtype`):

    /data/plate.zarr/B/3/0#c=2        plate folder / row / column / field # channel index

The plate, well and image metadata are read with ome-zarr-py (`ome_zarr`), the pixels with zarr: level 0 of
the field's multiscale pyramid, t = 0, z = 0 (a field with several planes is refused, never silently cut).

Example:
    >>> fields = plate_fields("/data/plate.zarr")
    >>> fields.columns.tolist()
    ['Metadata_Plate', 'Metadata_Well', 'Metadata_Site', 'Image_Path_Actin', 'Image_Path_Tubulin', 'Image_Path_DAPI']
    >>> read_zarr_plane(fields["Image_Path_DAPI"].iloc[0]).shape
    (1024, 1280, 1)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.storage import make_temporary_folder

PATH_PREFIX = "Image_Path_"  # as cellmorph.data.table.PATH_PREFIX (kept here: table imports this module)
DTYPES = ("uint8", "uint16")
_REF = re.compile(r"^(?P<plate>.+\.zarr)/(?P<row>[^/#]+)/(?P<col>[^/#]+)/(?P<field>[^/#]+)#c=(?P<c>\d+)$")
_WRITE_HINT = "Write the plate with ome-zarr-py (ome_zarr.writer: write_plate_metadata, write_well_metadata, write_image) or cellmorph.data.omezarr.write_plate"


def is_zarr_ref(path: object) -> bool:
    """Whether `path` is an image reference into an OME-Zarr plate (not a file path).

    >>> is_zarr_ref("/x/plate.zarr/B/3/0#c=2"), is_zarr_ref("/x/img.png")
    (True, False)"""
    return isinstance(path, (str, os.PathLike)) and _REF.match(str(path)) is not None


@dataclass(frozen=True)
class _Ref:
    plate: str
    field: str  # plate/row/col/field
    channel: int


def _parse(ref: object) -> _Ref:
    m = _REF.match(str(ref))
    if m is None:
        raise CellmorphError(f"{ref}: not an OME-Zarr image reference (expected PLATE.zarr/ROW/COLUMN/FIELD#c=CHANNEL, e.g. /x/plate.zarr/B/3/0#c=2).")
    plate = m["plate"]
    return _Ref(plate, f"{plate}/{m['row']}/{m['col']}/{m['field']}", int(m["c"]))


def _older_format_notice(record: logging.LogRecord) -> bool:
    """ome-zarr-py warns "version mismatch" on every group of a plate in an older OME-NGFF version (0.4 in zarr v2),
    which it reads correctly: not the user's problem, and one line per field would bury cellmorph's own output."""
    return not str(record.msg).startswith("version mismatch")


def _attrs(path: str) -> dict | None:
    """The OME-NGFF attributes of the group at `path` (ome-zarr-py unwraps 0.5's "ome" key), None when no group."""
    from ome_zarr.io import parse_url

    io_log = logging.getLogger("ome_zarr.io")
    if _older_format_notice not in io_log.filters:
        io_log.addFilter(_older_format_notice)

    try:
        loc = parse_url(path, mode="r")
    except Exception:  # noqa: BLE001 - an unreadable zarr.json: the caller says what is missing
        return None
    return None if loc is None else dict(loc.root_attrs)


@dataclass(frozen=True)
class _Field:
    """A field's level-0 array and what its metadata say about it."""

    path: str  # the array's folder
    axes: str  # e.g. "tczyx", "cyx"
    shape: tuple[int, ...]
    dtype: str
    channels: tuple[str, ...]  # omero labels ("" where none)


def _open_field(field: str, where: str) -> _Field:
    """The field group's multiscale (level 0) and channel labels; a missing or corrupt field is an error."""
    import zarr

    attrs = _attrs(field)
    if attrs is None:
        raise CellmorphError(f"{field}: missing field (no zarr group there) in plate {where}. Write the field or remove it from its well's metadata.")
    try:
        ms = attrs["multiscales"][0]
        level0 = ms["datasets"][0]["path"]
        axes = "".join(a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])).lower()
    except (KeyError, IndexError, TypeError):
        raise CellmorphError(f"{field}: no multiscales metadata (plate {where}); the field is not an OME-NGFF image. {_WRITE_HINT}.") from None
    try:
        arr = zarr.open_array(f"{field}/{level0}", mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises its own types for missing and damaged metadata
        raise CellmorphError(f"{field}/{level0}: missing or corrupt image array ({type(err).__name__}: {err}) in plate {where}. "
                             "Rewrite the field, or remove it from its well's metadata.") from None
    axes = axes or "tczyx"[-arr.ndim:]
    if len(axes) != arr.ndim or "y" not in axes or "x" not in axes:
        raise CellmorphError(f"{field}: axes {axes!r} do not fit the array's {arr.ndim} dimensions {arr.shape} (plate {where}).")
    labels = [str(c.get("label") or "") for c in (attrs.get("omero") or {}).get("channels", []) if isinstance(c, dict)]
    n = arr.shape[axes.index("c")] if "c" in axes else 1
    return _Field(f"{field}/{level0}", axes, tuple(arr.shape), str(arr.dtype), tuple(labels if len(labels) == n else [""] * n))


def _check_field(f: _Field, ref: str) -> None:
    """Only single-plane uint8/uint16 fields are read."""
    planes = {a: f.shape[f.axes.index(a)] for a in "tz" if a in f.axes}
    if any(v > 1 for v in planes.values()):
        raise CellmorphError(f"{ref}: the field has {', '.join(f'{a.upper()} = {v}' for a, v in planes.items())}; cellmorph reads only "
                             "single-plane fields (T = 1, Z = 1). Project the stack (e.g. a maximum projection) into a new plate first.")
    if f.dtype not in DTYPES:
        kind = " (floating-point images: cellmorph cannot know their intensity range)" if f.dtype.startswith("float") else ""
        raise CellmorphError(f"{ref}: {f.dtype} pixels{kind}; cellmorph reads uint8 or uint16 images. Convert the plate's images to 8- or 16-bit.")


def read_zarr_plane(ref: str) -> np.ndarray:
    """One channel of one field as an H x W x 1 array (level 0, t = 0, z = 0).

    >>> read_zarr_plane("/x/plate.zarr/B/3/0#c=2").shape
    (1024, 1280, 1)"""
    import zarr

    r = _parse(ref)
    f = _open_field(r.field, r.plate)
    _check_field(f, str(ref))
    n = f.shape[f.axes.index("c")] if "c" in f.axes else 1
    if r.channel >= n:
        raise CellmorphError(f"{ref}: channel {r.channel} does not exist; the field has {n} channel(s) (0-{n - 1}).")
    index = tuple({"c": r.channel, "t": 0, "z": 0}.get(a, slice(None)) for a in f.axes)
    try:
        plane = np.asarray(zarr.open_array(f.path, mode="r")[index])
    except Exception as err:  # noqa: BLE001 - codecs raise their own types on damaged chunks
        raise CellmorphError(f"{ref}: cannot read the image array ({type(err).__name__}: {err}); its chunks are corrupt. Rewrite the field.") from None
    if f.axes.index("y") > f.axes.index("x"):
        plane = plane.T
    return plane[:, :, None]


def zarr_ref_shape(ref: str) -> tuple[int, int]:
    """Height and width of the referenced plane, from the array's metadata (nothing decoded).

    >>> zarr_ref_shape("/x/plate.zarr/B/3/0#c=2")
    (1024, 1280)"""
    r = _parse(ref)
    f = _open_field(r.field, r.plate)
    return f.shape[f.axes.index("y")], f.shape[f.axes.index("x")]


def zarr_ref_dtype(ref: str) -> str:
    """The pixel type of the referenced field ("uint8", "uint16", ...), from the array's metadata.

    >>> zarr_ref_dtype("/x/plate.zarr/B/3/0#c=2")
    'uint16'"""
    r = _parse(ref)
    return _open_field(r.field, r.plate).dtype


def zarr_ref_exists(ref: str) -> bool:
    """Whether the referenced field's level-0 array exists and holds the channel.

    >>> zarr_ref_exists("/x/plate.zarr/B/3/0#c=2")
    True"""
    try:
        r = _parse(ref)
        f = _open_field(r.field, r.plate)
    except CellmorphError:
        return False
    return r.channel < (f.shape[f.axes.index("c")] if "c" in f.axes else 1)


def zarr_ref_stat(ref: str) -> list[int]:
    """[bytes, newest mtime_ns, inode of the array folder, newest ctime_ns] over the level-0 array's files: what
    changes when any of its chunks is rewritten (the cheap check before a content hash; see data.store.file_digests).

    >>> zarr_ref_stat("/x/plate.zarr/B/3/0#c=2")[0]
    2621952"""
    r = _parse(ref)
    folder = _open_field(r.field, r.plate).path
    size = mtime = ctime = 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            size, mtime, ctime = size + st.st_size, max(mtime, st.st_mtime_ns), max(ctime, st.st_ctime_ns)
    return [size, mtime, os.stat(folder).st_ino, ctime]


def zarr_ref_digest(ref: str) -> str:
    """A content hash (BLAKE2b, 128-bit) of the referenced plane's pixels, shape and type.

    >>> len(zarr_ref_digest("/x/plate.zarr/B/3/0#c=2"))
    32"""
    plane = read_zarr_plane(ref)
    h = hashlib.blake2b(f"{plane.dtype}|{plane.shape}|".encode(), digest_size=16)
    h.update(np.ascontiguousarray(plane).tobytes())
    return h.hexdigest()


def plate_fields(path: str | Path) -> pd.DataFrame:
    """One row per field of an OME-Zarr HCS plate: Metadata_Plate, Metadata_Well (B03), Metadata_Site (field index
    + 1) and one Image_Path_<Channel> column per channel (omero labels, else C0, C1...) of image references.

    Every field is checked from its metadata before anything is returned (nothing decoded): a folder without plate
    metadata, a field listed in its well's metadata but missing on disk (wells may hold different numbers of fields, as NGFF allows),
    channels that differ between fields, a pixel type other than uint8/uint16 and stacks (Z or T > 1) are errors
    naming the plate and the fix.

    >>> plate_fields("/data/plate.zarr")[["Metadata_Well", "Metadata_Site", "Image_Path_DAPI"]].iloc[0].tolist()
    ['B03', 1, '/data/plate.zarr/B/3/0#c=2']"""
    plate = Path(path).expanduser().resolve()
    if not plate.is_dir():
        raise CellmorphError(f"{plate}: OME-Zarr plate not found. Give the plate's top folder (PLATE.zarr, holding the plate metadata).")
    attrs = _attrs(str(plate))
    if not attrs or not isinstance(attrs.get("plate"), dict):
        raise CellmorphError(f"{plate}: not an OME-Zarr HCS plate (no plate metadata). Give the plate's top folder, not a well or an "
                             f"image inside it; a single image or a plain zarr array is not a plate. {_WRITE_HINT}.")
    if plate.suffix != ".zarr":
        raise CellmorphError(f"{plate}: the plate's folder name must end in .zarr (cellmorph's image references name it); rename it.")
    meta = attrs["plate"]
    name = str(meta.get("name") or plate.stem)
    wells = [w.get("path", "") for w in meta.get("wells", []) if isinstance(w, dict)]
    if not wells:
        raise CellmorphError(f"{plate}: the plate metadata lists no wells. {_WRITE_HINT}.")
    rows, first = [], None
    for well in wells:
        parts = str(well).strip("/").split("/")
        well_attrs = _attrs(str(plate / well))
        if len(parts) != 2 or not well_attrs or not isinstance(well_attrs.get("well"), dict):
            raise CellmorphError(f"{plate}: well {well} (listed in the plate metadata) has no well metadata on disk (missing well). "
                                 "Write the well, or remove it from the plate metadata.")
        row, col = parts
        if not (row.isalpha() and col.isdigit()):
            raise CellmorphError(f"{plate}: well {well}: expected a row letter and a column number (like B/3). Rename the well.")
        images = [im.get("path") for im in well_attrs["well"].get("images", []) if isinstance(im, dict)]
        for site, image in enumerate(images, start=1):
            ref = f"{plate}/{row}/{col}/{image}"
            f = _open_field(ref, str(plate))
            _check_field(f, ref)
            channels = f.shape[f.axes.index("c")] if "c" in f.axes else 1
            if first is None:
                first = (ref, channels, f.channels)
            elif (channels, f.channels) != first[1:]:
                raise CellmorphError(f"{plate}: channels differ between fields: {first[0]} has {first[1]} {list(first[2])}, {ref} has "
                                     f"{channels} {list(f.channels)}. Every field of a plate needs the same channels in the same order.")
            rows.append({"Metadata_Plate": name, "Metadata_Well": f"{row.upper()}{int(col):02d}", "Metadata_Site": site,
                         "_field": ref})
    if first is None:
        raise CellmorphError(f"{plate}: the wells list no fields. {_WRITE_HINT}.")
    df = pd.DataFrame(rows)
    for c, label in enumerate(_channel_names(first[2])):
        df[f"{PATH_PREFIX}{label}"] = df["_field"] + f"#c={c}"
    return df.drop(columns="_field")


def _channel_names(labels: tuple[str, ...]) -> list[str]:
    """Column-safe channel names from omero labels ("F-actin" -> "F_actin"); C0, C1... when any is missing or repeated."""
    names = [re.sub(r"\W+", "_", label).strip("_") for label in labels]
    if all(names) and len(set(names)) == len(names):
        return names
    return [f"C{i}" for i in range(len(labels))]


def write_plate(path: str | Path, images: Mapping[tuple, np.ndarray], channel_names: list[str], plate_name: str | None = None) -> Path:
    """Write an OME-Zarr HCS plate with ome-zarr-py: `images` maps (row, column, field) to a C x H x W uint8 or uint16
    array; every field gets two pyramid levels and omero channel labels. The folder must not exist yet.

    `images` may be any mapping, e.g. one that reads each field when asked: fields are read one at a time, in plate
    order, and written straight away. The plate is written in a temporary folder beside `path` and renamed into place
    when complete, so a bad field or a full disk leaves nothing behind.

    >>> write_plate("out/plate.zarr", {("B", 3, 0): np.zeros((3, 256, 256), np.uint8)}, ["Actin", "Tubulin", "DAPI"], "P1")
    PosixPath('out/plate.zarr')"""
    import shutil

    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    path = Path(path).expanduser()
    if path.exists():
        raise CellmorphError(f"{path}: already exists; write the plate to a new folder (or remove the old one).")
    if not len(images):
        raise CellmorphError(f"{path}: no images to write.")
    wells: dict[tuple[str, str], list[tuple[str, tuple]]] = {}
    for key in sorted(images, key=lambda k: (str(k[0]), int(k[1]), int(k[2]))):
        row, col, field = key
        wells.setdefault((str(row), str(int(col))), []).append((str(field), key))
    rows = sorted({r for r, _ in wells})
    cols = sorted({c for _, c in wells}, key=int)
    tmp = make_temporary_folder(path)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        write_plate_metadata(root, rows, cols, [f"{r}/{c}" for r, c in wells], name=plate_name or path.stem,
                             field_count=max(map(len, wells.values())))
        for (row, col), fields in wells.items():
            well = root.require_group(row).require_group(col)
            write_well_metadata(well, [f for f, _ in fields])
            for field, key in fields:
                arr = np.asarray(images[key])
                if arr.ndim != 3 or arr.shape[0] != len(channel_names) or str(arr.dtype) not in DTYPES:
                    raise CellmorphError(f"{path}: field {key}: expected a {len(channel_names)} x H x W uint8 or uint16 array, got {arr.dtype} {arr.shape}.")
                top = float(np.iinfo(arr.dtype).max)
                omero = {"channels": [{"label": n, "color": "FFFFFF", "window": {"start": 0.0, "end": top, "min": 0.0, "max": top}}
                                      for n in channel_names]}
                write_image(np.ascontiguousarray(arr), well.require_group(field), axes="cyx", scale_factors=[2] if min(arr.shape[1:]) >= 2 else [],
                            omero=omero)
        os.rename(tmp, path)
    finally:
        if tmp.exists():  # made by us just now: everything in it is ours
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_WELL = re.compile(r"^([A-Za-z]+)0*(\d+)$")


class _StoreFields(Mapping):
    """(row, column, field) -> one image of a prepared store, read from its memory-mapped images.npy when asked."""

    def __init__(self, images: np.ndarray, positions: dict[tuple, int]):
        self.images, self.positions = images, positions

    def __getitem__(self, key):
        return self.images[self.positions[key]]

    def __iter__(self):
        return iter(self.positions)

    def __len__(self):
        return len(self.positions)


def write_prepared_plates(store: str | Path, out: str | Path) -> list[Path]:
    """Each plate of a prepared store (`cellmorph prepare`) as an OME-Zarr HCS plate, out/<plate>.zarr: its wells, each
    prepared image (a crop, or a whole field) a field of its well in the store's order, uint8 channels named as in
    prepared.json; and out/platemap.csv, the store's per-well metadata (the columns constant within each well), so that
    the plates train through `cellmorph run` (dataset "omezarr", options.platemap). One image in memory at a time.
    `out` must be a new or empty folder.

    >>> write_prepared_plates("prepared/plate7", "prepared/plate7-zarr")
    [PosixPath('prepared/plate7-zarr/Week1_22123.zarr')]"""
    import json

    store, out = Path(store).expanduser(), Path(out).expanduser()
    check_export_folder(out)
    recipe = json.loads((store / "prepared.json").read_text())
    index = pd.read_parquet(store / "index.parquet")
    images = np.load(store / "images.npy", mmap_mode="r")
    channels = [str(c) for c in recipe.get("channels") or [f"C{i}" for i in range(images.shape[1])]]
    bad = sorted({str(w) for w in index["Metadata_Well"] if not _WELL.match(str(w))})
    if bad:
        raise CellmorphError(f"{store}: wells {bad[:3]} are not a row letter and a column number (like B03); an OME-Zarr plate cannot name them.")
    written = []
    for plate, rows in index.groupby("Metadata_Plate", sort=True):
        positions, count = {}, {}
        for pos, well in zip(rows.index, rows["Metadata_Well"].astype(str)):
            r, c = _WELL.match(well).groups()
            k = count.get(well, 0)
            count[well] = k + 1
            positions[(r.upper(), int(c), k)] = int(pos)
        written.append(write_plate(out / f"{plate}.zarr", _StoreFields(images, positions), channels, plate_name=str(plate)))
    meta = [c for c in index.columns if c.startswith("Metadata_")]
    per_well = index.groupby(["Metadata_Plate", "Metadata_Well"], sort=True)[meta].nunique(dropna=False)
    # Metadata_Site is the plate reader's own (a field's index in its well): never a well's metadata
    constant = [c for c in meta if c not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") and (per_well[c] <= 1).all()]
    platemap = index.groupby(["Metadata_Plate", "Metadata_Well"], sort=True)[constant].first().reset_index()
    platemap.to_csv(out / "platemap.csv", index=False)
    return written


def check_export_folder(out: Path) -> None:
    """An OME-Zarr export goes to a new or empty folder: cellmorph never writes among a user's files there."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CellmorphError(f"--ome-zarr {out}: exists and is not an empty folder. Give a new folder for the OME-Zarr plates "
                             "(cellmorph writes one PLATE.zarr per plate and platemap.csv there).")
