"""`cellmorph prepare`: raw plates -> a prepared store (images.npy + index.parquet + prepared.json) that training reads.

BBBC021 (Kensert et al. 2019's preprocessing), one plate at a time:

  1. the DMSO fields of the plate: exact histograms of each channel's raw values (streaming, 65,536 counts
     per channel), hence the mean and standard deviation of their Anscombe-transformed pixels;
  2. each treatment field: stack (Actin, Tubulin, DAPI), Anscombe, z-score with the plate's DMSO statistics,
     map the field to 0-255 by its own min and max, truncate to uint8, tile into 2 x 2 crops (512 x 640 on a
     1024 x 1280 field), drop near-empty crops (<= 0.2% of values above 255/5.1).

Memory: the plate's histograms plus the fields in flight (a few per worker); crops go straight into a
memory-mapped images.npy. Fields are read and normalised in a thread pool (numpy and the TIFF reader
release the GIL). The store is built in a staging folder beside --out and replaces the store in --out only
once it is complete (prepared.json, written last, marks it so): a failed, interrupted or killed prepare leaves
the previous store as it was, and the next prepare removes a killed one's staging folder (StoreWriter).

BBBC013/BBBC014 (translocation): the 2 channels plus a zero channel (R = 0, G = reporter, B = nuclei),
Anscombe, the field's min-max to 8-bit, 4 x 4 = 16 crops (BBBC014 first resized to 1024 x 1024 by area, as
the paper). Crops are resized to the model input at training time.
"""

from __future__ import annotations

import fcntl
import io as _io
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph import __version__
from cellmorph.errors import CellmorphError
from cellmorph.io import check_writable, is_no_space, no_space_error, no_space_is_an_error
from cellmorph.data.preprocess import (
    EMPTY_FRACTION,
    EMPTY_LEVEL,
    anscombe_minmax_uint8,
    anscombe_stats,
    normalize_field,
    pixel_histogram,
    read_image,
    resize_uint8,
    tile_boxes,
    zscore_tables,
)
from cellmorph.progress import make_progress



# --- reading raw fields ---------------------------------------------------------------------------------------


def read_raw_field(paths: list[str], channels: list[str], dtype=np.uint16) -> np.ndarray:
    """The channel files of one field, stacked as C x H x W of `dtype`; clear errors for a wrong bit depth or size."""
    planes = []
    for p, ch in zip(paths, channels):
        arr = read_image(p)  # CellmorphError naming the file when missing or corrupt
        if arr.shape[2] != 1:
            if arr.shape[2] >= 3 and np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 0], arr[:, :, 2]):
                arr = arr[:, :, :1]  # grey saved as RGB (some BMPs)
            else:
                raise CellmorphError(f"{p}: expected one grey channel ({ch}), got {arr.shape[2]} channels.")
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


def _shrink_npy(path: Path, n: int) -> None:
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


PREPARED_FILES = ("images.npy", "index.parquet", "prepared.json")  # prepared.json last: it marks a store complete
STAGING = ".prepare-tmp-"  # a store being built: the sibling folder `.<out name>.prepare-tmp-XXXX`
_LOCK = ".lock"  # held (flock) by the prepare building in a staging folder; released by the kernel when it dies


def _staging_pattern(out: Path) -> re.Pattern:
    return re.compile(r"^\." + re.escape(out.name) + re.escape(STAGING) + r"[A-Za-z0-9_]+$")


_OWN_TEMPORARY = re.compile(r"^\.(" + "|".join(re.escape(n) for n in PREPARED_FILES) + r")\.tmp-[A-Za-z0-9_]+$")


def clean_prepare_leftovers(out: Path) -> list[Path]:
    """Remove what a killed `cellmorph prepare --out OUT` left, and nothing else; returns what it removed.

    Only cellmorph's own names: in OUT, temporaries `.images.npy.tmp-*`, `.index.parquet.tmp-*`,
    `.prepared.json.tmp-*` (io.atomic_path's, as older versions wrote the store in place); beside OUT,
    staging folders `.<OUT name>.prepare-tmp-*` that no live prepare holds (their lock is free), of which
    only the store's files and the lock are removed (the folder itself only when that empties it).
    """
    out = Path(out)
    removed: list[Path] = []
    if out.is_dir():
        for f in out.iterdir():
            if _OWN_TEMPORARY.match(f.name) and f.is_file() and not f.is_symlink():
                f.unlink(missing_ok=True)
                removed.append(f)
    if not out.parent.is_dir():
        return removed
    pattern = _staging_pattern(out)
    for d in out.parent.iterdir():
        if not (pattern.match(d.name) and d.is_dir() and not d.is_symlink()):
            continue
        lock_path = d / _LOCK
        try:
            lock = open(lock_path, "a")
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a prepare is building there right now
            for f in d.iterdir():
                if (f.name in PREPARED_FILES or _OWN_TEMPORARY.match(f.name)) and f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
                    removed.append(f)
            lock_path.unlink(missing_ok=True)
        try:
            d.rmdir()
            removed.append(d)
        except OSError:
            pass  # something that is not cellmorph's is in there: leave it
    return removed


class StoreWriter:
    """Writes a prepared store: crops appended to images.npy (its header sized for the most crops there can be,
    cut to the crops kept at the end), their metadata rows to index.parquet, the recipe to prepared.json (last).

    The store is built in a staging folder beside `out` (`.<out name>.prepare-tmp-XXXX`); only when it is
    complete does it replace the store in `out` (prepared.json removed first, then images.npy and
    index.parquet renamed over the old ones, prepared.json last), so a failed or interrupted prepare leaves
    the previous store as it was. Nothing else in `out` is touched. A killed prepare's staging folder is
    removed by the next prepare into the same `out` (`clean_prepare_leftovers`).

    Crops are appended with plain writes, not a memory map, so finished crops leave the process's memory.
    """

    def __init__(self, folder: Path, capacity: int, image_shape: tuple[int, ...]):
        self.out = Path(folder)
        if self.out.exists() and not self.out.is_dir():
            raise CellmorphError(f"--out {self.out} is a file, not a folder. Pass --out with a folder for the prepared store.")
        parent = check_writable(self.out.parent)
        clean_prepare_leftovers(self.out)
        try:
            self.folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.out.name}{STAGING}"))
            self._lock = open(self.folder / _LOCK, "w")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError as err:
            if is_no_space(err):
                raise no_space_error(self.out, err) from None
            raise CellmorphError(f"output folder {parent} is not writable ({err.strerror}). Pass --out with a folder you can write.") from None
        self.shape = tuple(image_shape)
        self._tmp = self.folder / "images.npy"
        with no_space_is_an_error(self.out / "images.npy"):
            self._file = open(self._tmp, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (capacity, *self.shape)}
            np.lib.format.write_array_header_1_0(self._file, header)
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
            _shrink_npy(self._tmp, len(self.rows))
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
        (self.folder / _LOCK).unlink(missing_ok=True)
        if not self.out.exists():
            os.rename(self.folder, self.out)  # one rename: the whole store appears at once
        else:
            (self.out / "prepared.json").unlink(missing_ok=True)  # the old store stops looking whole first
            for name in PREPARED_FILES:  # prepared.json last
                os.replace(self.folder / name, self.out / name)
            self.folder.rmdir()
        self._lock.close()

    def abort(self) -> None:
        """Remove the staging folder (only cellmorph's files in it); `out` is left as it was."""
        self._file.close()
        for name in (*PREPARED_FILES, _LOCK):
            (self.folder / name).unlink(missing_ok=True)
        self._lock.close()
        try:
            self.folder.rmdir()
        except OSError:
            pass


# --- BBBC021 --------------------------------------------------------------------------------------------------


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def plate_stats(paths: list[list[str]], channels: list[str], pool: ThreadPoolExecutor, workers: int, on_field=None, levels: int = 65536):
    """Per channel (mean, std) of the Anscombe-transformed pixels of the given (DMSO) fields: exact, streaming."""

    def hist(ps):
        field = read_raw_field(ps, channels)
        return np.stack([pixel_histogram(field[c], levels) for c in range(field.shape[0])])

    total = None
    for chunk in _chunks(paths, 4 * workers):  # at most 4 fields per worker in flight
        for h in pool.map(hist, chunk):
            total = h if total is None else total + h
            if on_field:
                on_field()
    return [anscombe_stats(total[c]) for c in range(total.shape[0])]


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


def prepare_bbbc021(
    data_dir: Path,
    out: Path,
    images_root: Path | None = None,
    plates: list[str] | None = None,
    image_size: int = 0,
    workers: int | None = None,
    grid: tuple[int, int] = (2, 2),
    fields: pd.DataFrame | None = None,
) -> dict:
    """Raw BBBC021 plates -> prepared store in `out`. Returns prepared.json's content."""
    from cellmorph.data.datasets.bbbc021_raw import CHANNELS, raw_fields

    if fields is None:
        fields = raw_fields(Path(data_dir), images_root, plates)
    check_plates(fields)
    fields = fields[fields["Metadata_Plate"].isin(fields.loc[fields["Metadata_Role"] == "treatment", "Metadata_Plate"])]
    channels = list(CHANNELS)
    path_cols = [f"Image_Path_{c}" for c in channels]
    treat = fields[fields["Metadata_Role"] == "treatment"]
    if treat.empty:
        raise CellmorphError("no annotated treatment fields to prepare (check --plates and the metadata).")
    first = read_raw_field(treat[path_cols].iloc[0].tolist(), channels)
    h, w = tile_boxes(first.shape[1], first.shape[2], grid)[0][2:]
    shape = (len(channels), image_size, image_size) if image_size else (len(channels), h, w)
    meta_cols = [c for c in fields.columns if c.startswith("Metadata_") and c != "Metadata_Role"]
    workers = workers or os.cpu_count() or 1
    writer = StoreWriter(Path(out), len(treat) * grid[0] * grid[1], shape)
    per_plate, dropped = {}, []
    try:
        with make_progress() as progress, ThreadPoolExecutor(workers) as pool:
            task = progress.add_task("preparing bbbc021", total=len(fields))
            for plate, pf in fields.groupby("Metadata_Plate", sort=True):
                progress.update(task, description=f"{plate}: DMSO statistics")
                dmso = pf[pf["Metadata_Role"] == "dmso"]
                stats = plate_stats(dmso[path_cols].values.tolist(), channels, pool, workers, lambda: progress.advance(task))
                for ch, (m, s) in zip(channels, stats):
                    if not s > 0:
                        raise CellmorphError(f"plate {plate}: the DMSO fields' {ch} channel is constant (std 0); check those files.")
                ztab = zscore_tables([m for m, _ in stats], [s for _, s in stats], 65536)
                progress.update(task, description=f"{plate}: treatments")
                tf = pf[pf["Metadata_Role"] == "treatment"]

                def work(ps):
                    field = read_raw_field(ps, channels)
                    if field.shape != first.shape:
                        raise CellmorphError(f"{ps[0]}: field size {field.shape[1:]} differs from the first field's {first.shape[1:]}.")
                    return normalize_field(field, ztab, grid)

                rows = tf[meta_cols].to_dict("records")
                kept_n = 0
                for chunk_rows, chunk_paths in zip(_chunks(rows, 4 * workers), _chunks(tf[path_cols].values.tolist(), 4 * workers)):
                    for row, (crops, kept) in zip(chunk_rows, pool.map(work, chunk_paths)):
                        for k, (crop, keep) in enumerate(zip(crops, kept), start=1):
                            if not keep:
                                dropped.append(f"{row['Metadata_Plate']}/{row['Metadata_Well']}/s{row['Metadata_Site']}/crop{k}")
                                continue
                            if image_size:
                                crop = resize_uint8(crop.transpose(1, 2, 0), image_size).transpose(2, 0, 1)
                            writer.add(crop, {**row, "Metadata_Crop": k})
                            kept_n += 1
                        progress.advance(task)
                per_plate[plate] = {
                    "dmso_fields": len(dmso),
                    "treatment_fields": len(tf),
                    "crops_kept": kept_n,
                    "dmso_anscombe_mean": dict(zip(channels, [round(m, 6) for m, _ in stats])),
                    "dmso_anscombe_std": dict(zip(channels, [round(s, 6) for _, s in stats])),
                }
        recipe = {
            "dataset": "bbbc021",
            "channels": channels,
            "preprocessing": "Anscombe 2*sqrt(x+3/8); z-score per plate and channel by all DMSO pixels; per-field min-max "
            f"to 0-255 (all channels), truncated to uint8; {grid[0]}x{grid[1]} crops; crops with <= {EMPTY_FRACTION:.1%} "
            f"of values > {EMPTY_LEVEL:.1f} dropped; only the 103 annotated treatments, taxol only Week1 D01-D09 at 0.3/1/3 uM",
            "image_size": image_size,
            "plates": per_plate,
            "crops_dropped": dropped,
        }
        writer.finish(recipe)
    except BaseException:
        writer.abort()
        raise
    return load_recipe(out)


# --- translocation (BBBC013, BBBC014) --------------------------------------------------------------------------


def _resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize one integer plane to (height, width), keeping its dtype (the paper's cv2.INTER_AREA)."""
    from PIL import Image

    if plane.shape == size:
        return plane
    out = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size[1], size[0]), Image.Resampling.BOX))
    info = np.iinfo(plane.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)


def translocation_crops(field: np.ndarray, grid: tuple[int, int] = (4, 4), resize: tuple[int, int] | str | None = None) -> list[np.ndarray]:
    """2 x H x W raw field (reporter, nuclei) -> 16 uint8 crops of (0, reporter, nuclei)."""
    if resize == "square":  # BBBC014: 1360 x 1024 -> 1024 x 1024, as the paper
        resize = (field.shape[1], field.shape[1])
    if resize is not None:
        field = np.stack([_resize_plane(p, resize) for p in field])
    img = anscombe_minmax_uint8(field)
    img = np.concatenate([np.zeros_like(img[:1]), img])
    return [img[:, t : t + h, l : l + w] for t, l, h, w in tile_boxes(img.shape[1], img.shape[2], grid)]


def prepare_translocation(name: str, data_dir: Path, out: Path, workers: int | None = None) -> dict:
    from cellmorph.data.catalog import load_dataset

    table = load_dataset(name, data_dir)
    df = table.df
    channels = [c.removeprefix("Image_Path_") for c in table.path_columns]
    resize = "square" if name == "bbbc014" else None
    grid = (4, 4)

    def work(ps):
        planes = []
        for p, ch in zip(ps, channels):
            arr = read_image(p)
            if arr.dtype not in (np.uint8, np.uint16):
                raise CellmorphError(f"{p}: expected an 8- or 16-bit image ({ch}), got {arr.dtype}.")
            planes.append(read_raw_field([p], [ch], dtype=arr.dtype)[0])
        if len({p.shape for p in planes}) > 1 or len({p.dtype for p in planes}) > 1:
            raise CellmorphError(f"the channel files of one well differ in size or bit depth: {ps}")
        return translocation_crops(np.stack(planes), grid, resize)

    paths = df[table.path_columns].values.tolist()
    first = work(paths[0])
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    writer = StoreWriter(Path(out), len(df) * 16, first[0].shape)
    try:
        with make_progress() as progress, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            task = progress.add_task(f"preparing {name}", total=len(df))
            for row, crops in zip(df[meta_cols].to_dict("records"), pool.map(work, paths)):
                for k, crop in enumerate(crops, start=1):
                    writer.add(crop, {**row, "Metadata_Crop": k})
                progress.advance(task)
        recipe = {
            "dataset": name,
            "channels": ["zero", *channels],
            "preprocessing": "2 channels + a zero channel; Anscombe 2*sqrt(x+3/8); per-field min-max to 0-255 (both channels), "
            "truncated to uint8; 4x4 = 16 crops" + ("; fields first area-resized to square (1360x1024 -> 1024x1024)" if resize else ""),
            "label_column": table.label,
        }
        writer.finish(recipe)
    except BaseException:
        writer.abort()
        raise
    return load_recipe(out)


def prepare(name: str, data_dir: Path, out: Path, **kw) -> dict:
    """`cellmorph prepare NAME`: the preparation each dataset registers (datasets/registry.py)."""
    from cellmorph.data.registry import preparer

    return preparer(name)(data_dir, out, **kw)


def load_recipe(folder: Path) -> dict:
    return json.loads((Path(folder) / "prepared.json").read_text())
