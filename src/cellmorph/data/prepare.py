"""`cellmorph prepare`'s building blocks: reading a raw field's channel files, and the store writer (images.npy +
index.parquet + prepared.json) that training reads. The preprocessing itself (Kensert et al. 2019: Anscombe,
plate-wise control normalisation, 8-bit, crops) is cellmorph.data.plates, for any plate; BBBC021 and BBBC013/14
are presets of it (data/datasets/).

The store is built in a staging folder beside --out and replaces the store in --out only once it is complete
(prepared.json, written last, marks it so): a failed, interrupted or killed prepare leaves the previous store as it
was, and the next prepare removes a killed one's staging folder (StoreWriter)."""

from __future__ import annotations

import io as _io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.version import __version__
from cellmorph.errors import CellmorphError
from cellmorph.io import check_writable, no_space_is_an_error
from cellmorph.storage import PREPARED, clean_temporaries, locked, make_temporary_folder, remove_own_folder
from cellmorph.data.preprocess import (
    read_image,
)



# --- reading raw fields ---------------------------------------------------------------------------------------


def read_raw_field(paths: list[str], channels: list[str], dtype=np.uint16) -> np.ndarray:
    """The channel files of one field, stacked as C x H x W of `dtype` (None: 8- or 16-bit, the first file's, the same
    for every channel); clear errors for a wrong bit depth or size."""
    planes = []
    for p, ch in zip(paths, channels):
        arr = read_image(p)  # CellmorphError naming the file when missing or corrupt
        if arr.shape[2] != 1:
            if arr.shape[2] >= 3 and np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 0], arr[:, :, 2]):
                arr = arr[:, :, :1]  # grey saved as RGB (some BMPs)
            else:
                raise CellmorphError(f"{p}: expected one grey channel ({ch}), got {arr.shape[2]} channels.")
        if dtype is None:  # the first file decides: raw 8- or 16-bit
            if arr.dtype not in (np.uint8, np.uint16):
                raise CellmorphError(f"{p}: expected a raw 8- or 16-bit image ({ch} channel), got {arr.dtype.name} pixels. "
                                     "Use the microscope's original files, not converted (e.g. float) copies.")
            dtype = arr.dtype
        if arr.dtype != dtype:
            bits = np.dtype(dtype).itemsize * 8
            raise CellmorphError(
                f"{p}: wrong bit depth for the {ch} channel: expected {bits}-bit ({np.dtype(dtype).name}), got {arr.dtype.name}. "
                f"Use the microscope's original {bits}-bit TIFFs, not converted copies."
            )
        planes.append(arr[:, :, 0])
    shapes = {a.shape for a in planes}
    if len(shapes) > 1:
        raise CellmorphError(f"channel files of one field differ in size {sorted(shapes)}: {paths}")
    return np.stack(planes)


# --- the store writer -----------------------------------------------------------------------------------------


def shrink_npy(path: Path, n: int) -> None:
    """Cut a .npy file to its first n rows in place (numpy leaves room in the header for the first axis to change)."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        offset = f.tell()
        d = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (n, *shape[1:])}
        buf = _io.BytesIO()
        (fmt.write_array_header_1_0 if version == (1, 0) else fmt.write_array_header_2_0)(buf, d)
        if len(buf.getvalue()) != offset:
            raise RuntimeError(f"{path}: header size changed ({len(buf.getvalue())} != {offset})")
        f.seek(0)
        f.write(buf.getvalue())
        f.truncate(offset + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


PREPARED_FILES = PREPARED.files  # prepared.json last: it marks a store complete


class StoreWriter:
    """Writes a prepared store: crops appended to images.npy (its header sized for the most crops there can be,
    cut to the crops kept at the end), their metadata rows to index.parquet, the recipe to prepared.json (last).

    The store is built in a temporary folder beside `out` (`.<out name>.tmp-XXXX`, cellmorph.storage), while
    `out` is locked against a second prepare; only when it is complete does it replace the store in `out`
    (prepared.json removed first, then images.npy and index.parquet renamed over the old ones, prepared.json
    last), so a failed or interrupted prepare leaves the previous store as it was. Nothing else in `out` is
    touched (a prepared store may share its folder with the user's notes). What a killed prepare left (its
    temporary folder, and temporaries of the store's files) is removed by the next prepare into the same `out`.

    Crops are appended with plain writes, not a memory map, so finished crops leave the process's memory.
    """

    def __init__(self, folder: Path, capacity: int, image_shape: tuple[int, ...]):
        self.out = Path(folder)
        if self.out.exists() and not self.out.is_dir():
            raise CellmorphError(f"--out {self.out} is a file, not a folder. Pass --out with a folder for the prepared store.")
        check_writable(self.out.parent)
        self._lock = locked(self.out)
        self._lock.__enter__()
        try:
            clean_temporaries(self.out, PREPARED)
            self.folder = make_temporary_folder(self.out)
            self.shape = tuple(image_shape)
            self._tmp = self.folder / "images.npy"
            with no_space_is_an_error(self.out / "images.npy"):
                self._file = open(self._tmp, "wb")
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (capacity, *self.shape)}
                np.lib.format.write_array_header_1_0(self._file, header)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.rows: list[dict] = []

    def add(self, image: np.ndarray, row: dict) -> None:
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f"crop of shape {image.shape} {image.dtype}, store holds {self.shape} uint8")
        with no_space_is_an_error(self.out / "images.npy"):
            self._file.write(np.ascontiguousarray(image).tobytes())
        self.rows.append(row)

    def finish(self, recipe: dict) -> pd.DataFrame:
        with no_space_is_an_error(self.out / "images.npy"):
            self._file.close()
            shape = (len(self.rows), *self.shape)
            shrink_npy(self._tmp, len(self.rows))
        index = pd.DataFrame(self.rows)
        with no_space_is_an_error(self.out / "index.parquet"):
            index.to_parquet(self.folder / "index.parquet", index=False)
        recipe = {
            **recipe,
            "n_images": len(self.rows),
            "image_shape": list(shape[1:]),
            "cellmorph": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with no_space_is_an_error(self.out / "prepared.json"):
            (self.folder / "prepared.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        self._install()
        return index

    def _install(self) -> None:
        """The staged store is complete: put it in place of `out`'s store."""
        try:
            if not self.out.exists():
                os.rename(self.folder, self.out)  # one rename: the whole store appears at once
            else:
                (self.out / "prepared.json").unlink(missing_ok=True)  # the old store stops looking whole first
                for name in PREPARED_FILES:  # prepared.json last
                    os.replace(self.folder / name, self.out / name)
                self.folder.rmdir()
        finally:
            self._lock.__exit__(None, None, None)

    def abort(self) -> None:
        """Remove the temporary folder (only cellmorph's files in it); `out` is left as it was."""
        self._file.close()
        try:
            remove_own_folder(self.folder, PREPARED.names)
        finally:
            self._lock.__exit__(None, None, None)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def check_plates(fields: pd.DataFrame) -> None:
    """Every plate with treatment fields needs DMSO fields to normalise them."""
    roles = fields.groupby("Metadata_Plate")["Metadata_Role"].agg(set)
    bad = [p for p, r in roles.items() if "treatment" in r and "dmso" not in r]
    if bad:
        raise CellmorphError(
            f"plate(s) {bad[:5]} have treatment fields but no DMSO wells, so they cannot be normalised (per plate and "
            "channel by the DMSO pixels). Check Image_Metadata_Compound in the metadata for those plates, or leave them "
            "out with --plates."
        )


def load_recipe(folder: Path) -> dict:
    return json.loads((Path(folder) / "prepared.json").read_text())
