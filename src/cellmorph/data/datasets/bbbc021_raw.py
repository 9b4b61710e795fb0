"""Raw BBBC021 (Caie et al. 2010; Ljosa et al. 2012): the Broad's plate folders of 16-bit TIFFs + metadata.

Layout under the data folder (as the Broad publishes it; each plate zip unpacks to one folder):

    bbbc021-metadata/BBBC021_v1_image.csv[.gz]   one row per field: file name + path name per channel
                                                 (DAPI, Tubulin, Actin), plate, well, replicate, compound, concentration
    bbbc021-metadata/BBBC021_v1_moa.csv          the 103 annotated treatments (+ DMSO) and their MoA
    bbbc021-raw/Week1_22123/<file>.tif           the plate folders (or bbbc021-raw/Week1/Week1_22123/, the
                                                 layout of the CSV's Image_PathName_* columns)

`select_fields` keeps what the paper (Kensert et al. 2019) used: fields of the 103 annotated treatments
(compound + concentration in the MoA table), the taxol rule, and every DMSO field of a plate for its
normalisation. `cellmorph prepare bbbc021` (cellmorph.data.prepare) turns them into a store.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.datasets.download import fetch, read_manifest, sha256_file
from cellmorph.data.platemap import ROLE
from cellmorph.data.plates import PlateSettings, prepare_plate
from cellmorph.data.prepare import check_plates
from cellmorph.data.registry import register_download, register_prepare
from cellmorph.errors import CellmorphError

METADATA_DIR = "bbbc021-metadata"
RAW_DIR = "bbbc021-raw"
IMAGE_CSV = "BBBC021_v1_image.csv"
MOA_CSV = "BBBC021_v1_moa.csv"
# Store channel order = the paper's RGB: R = F-actin, G = B-tubulin, B = DAPI (as the bbbc021-subset PNGs).
CHANNELS = ("Actin", "Tubulin", "DAPI")
DMSO = "DMSO"

BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
PLATES = [
    "Week1_22123", "Week1_22141", "Week1_22161", "Week1_22361", "Week1_22381", "Week1_22401",
    "Week2_24121", "Week2_24141", "Week2_24161", "Week2_24361", "Week2_24381", "Week2_24401",
    "Week3_25421", "Week3_25441", "Week3_25461", "Week3_25681", "Week3_25701", "Week3_25721",
    "Week4_27481", "Week4_27521", "Week4_27542", "Week4_27801", "Week4_27821", "Week4_27861",
    "Week5_28901", "Week5_28921", "Week5_28961", "Week5_29301", "Week5_29321", "Week5_29341",
    "Week6_31641", "Week6_31661", "Week6_31681", "Week6_32061", "Week6_32121", "Week6_32161",
    "Week7_34341", "Week7_34381", "Week7_34641", "Week7_34661", "Week7_34681",
    "Week8_38203", "Week8_38221", "Week8_38241", "Week8_38341", "Week8_38342",
    "Week9_39206", "Week9_39221", "Week9_39222", "Week9_39282", "Week9_39283", "Week9_39301",
    "Week10_40111", "Week10_40115", "Week10_40119",
]  # fmt: skip

_IMAGE_COLUMNS = [
    *(f"Image_{k}_{c}" for c in ("DAPI", "Tubulin", "Actin") for k in ("FileName", "PathName")),
    "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Replicate",
    "Image_Metadata_Compound", "Image_Metadata_Concentration",
]  # fmt: skip
_SITE = re.compile(r"(?:^|_)([A-P]\d{2})_s(\d+)_w", re.IGNORECASE)


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, EOFError) as err:
        raise CellmorphError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err}). Restore the Broad's original file.") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CellmorphError(f"{path}: missing column(s) {missing}. Is this the Broad's {path.name.split('.')[0]}.csv?")
    return df


def find_metadata(data_dir: Path, name: str) -> Path:
    """`name` (or name.gz) in data_dir/bbbc021-metadata or data_dir itself."""
    for folder in (Path(data_dir) / METADATA_DIR, Path(data_dir)):
        for cand in (folder / name, folder / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise CellmorphError(
        f"{name} not found in {Path(data_dir) / METADATA_DIR} or {data_dir}. Download it with "
        "`cellmorph download bbbc021-raw --data DIR` (or copy the Broad's CSVs there)."
    )


def read_metadata(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image table, MoA table) as the Broad ships them, with the columns checked."""
    image = _read_csv(find_metadata(data_dir, IMAGE_CSV), _IMAGE_COLUMNS)
    moa = _read_csv(find_metadata(data_dir, MOA_CSV), ["compound", "concentration", "moa"])
    return image, moa


def taxol_kept(plate: pd.Series, well: pd.Series, concentration: pd.Series) -> pd.Series:
    """The paper's taxol rule: taxol fields are kept only from Week 1 plates, wells D01-D09, at 0.3, 1 or 3 uM.

    (Taxol at 0.3 uM sits on almost every plate as a positive control; the paper kept only the Week 1
    dose series, so one compound's images do not dominate the Microtubule-stabiliser class.)
    """
    week1 = plate.astype(str).str.startswith("Week1_")
    d0 = well.astype(str).str.upper().str.startswith("D0")
    conc = concentration.astype(float).round(6).isin([0.3, 1.0, 3.0])
    return week1 & d0 & conc


def select_fields(image: pd.DataFrame, moa: pd.DataFrame) -> pd.DataFrame:
    """One row per field used by the paper, with Metadata_* columns, file names and Metadata_Role.

    Metadata_Role is "treatment" (one of the 103 annotated treatments, after the taxol rule) or "dmso"
    (used only to normalise its plate). Metadata_Site comes from the file name ("..._C02_s3_w1...tif").
    """
    moa = moa.assign(_c=moa["compound"].astype(str), _x=moa["concentration"].astype(float).round(6))
    df = image.assign(_c=image["Image_Metadata_Compound"].astype(str), _x=image["Image_Metadata_Concentration"].astype(float).round(6))
    df = df.merge(moa[["_c", "_x", "moa"]], on=["_c", "_x"], how="inner")
    is_taxol = df["_c"] == "taxol"
    keep = ~is_taxol | taxol_kept(df["Image_Metadata_Plate_DAPI"], df["Image_Metadata_Well_DAPI"], df["_x"])
    df = df[keep]
    plate = df["Image_Metadata_Plate_DAPI"].astype(str)
    out = pd.DataFrame(
        {
            "Metadata_Plate": plate,
            "Metadata_Well": df["Image_Metadata_Well_DAPI"].astype(str),
            "Metadata_Site": 0,
            "Metadata_Compound": df["_c"],
            "Metadata_Concentration": df["_x"],
            "Metadata_Replicate": df["Replicate"].astype(int),
            "Metadata_Batch": plate.str.split("_").str[0],
            "Metadata_MoA": df["moa"].astype(str),
            "Metadata_Role": np.where(df["_c"] == DMSO, "dmso", "treatment"),
            "PathName": df["Image_PathName_DAPI"].astype(str),
        }
    )
    for ch in CHANNELS:
        out[f"FileName_{ch}"] = df[f"Image_FileName_{ch}"].astype(str).to_numpy()
    sites = out["FileName_DAPI"].str.extract(_SITE)
    bad = sites[1].isna() | (sites[0].str.upper() != out["Metadata_Well"].str.upper())
    if bad.any():
        r = out[bad].iloc[0]
        raise CellmorphError(
            f"{IMAGE_CSV}: file name {r['FileName_DAPI']} does not name the row's well {r['Metadata_Well']} and a site "
            f"(plate {r['Metadata_Plate']}); metadata and files disagree. Restore the Broad's original {IMAGE_CSV}."
        )
    out["Metadata_Site"] = sites[1].astype(int).to_numpy()
    return out.sort_values(["Metadata_Plate", "Metadata_Well", "Metadata_Site"], kind="stable").reset_index(drop=True)


def plate_folder(images_root: Path, plate: str, path_name: str) -> Path | None:
    """The folder of one plate: images_root/Week1_22123 (the zips' layout) or images_root/Week1/Week1_22123."""
    for cand in (images_root / plate, images_root / path_name):
        if cand.is_dir():
            return cand
    return None


def attach_paths(fields: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """Add Image_Path_<Channel> columns; clear errors when plate folders or channel files are missing."""
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise CellmorphError(
            f"raw image folder {images_root} does not exist. Unpack the Broad's plate zips there "
            "(`cellmorph download bbbc021-raw --data DIR`) or pass --images DIR."
        )
    fields = fields.copy()
    folders = {}
    for plate, path_name in fields[["Metadata_Plate", "PathName"]].drop_duplicates().itertuples(index=False):
        folders[plate] = plate_folder(images_root, plate, path_name)
    missing = sorted(p for p, f in folders.items() if f is None)
    if missing:
        present = sorted(p.name for p in images_root.iterdir() if p.is_dir())[:10]
        raise CellmorphError(
            f"metadata and folder disagree: {len(missing)} plate(s) of {IMAGE_CSV} have no folder in {images_root} "
            f"(e.g. {missing[:5]}; folders present: {present or 'none'}). Unpack those plates' zips there, or "
            "prepare only the plates you have with --plates."
        )
    for ch in CHANNELS:
        fields[f"Image_Path_{ch}"] = [str(folders[p] / f) for p, f in zip(fields["Metadata_Plate"], fields[f"FileName_{ch}"])]
    for row in fields.itertuples(index=False):
        for ch in CHANNELS:
            p = getattr(row, f"Image_Path_{ch}")
            if not Path(p).is_file():
                raise CellmorphError(
                    f"missing channel file: {p} ({ch} channel of plate {row.Metadata_Plate}, well {row.Metadata_Well}, "
                    f"site {row.Metadata_Site}, listed in {IMAGE_CSV} column Image_FileName_{ch}). Re-unpack that "
                    "plate's zip, or remove the field's row from the metadata."
                )
    return fields


def raw_fields(data_dir: Path, images_root: Path | None = None, plates: list[str] | None = None) -> pd.DataFrame:
    """The fields `cellmorph prepare bbbc021` processes, with their image paths checked."""
    image, moa = read_metadata(data_dir)
    fields = select_fields(image, moa)
    if plates:
        unknown = sorted(set(plates) - set(fields["Metadata_Plate"]))
        if unknown:
            raise CellmorphError(f"--plates: {unknown} not in {IMAGE_CSV} (plates look like Week1_22123).")
        fields = fields[fields["Metadata_Plate"].isin(plates)].reset_index(drop=True)
    return attach_paths(fields, Path(images_root) if images_root else Path(data_dir) / RAW_DIR)


# --- download (not run offline) -------------------------------------------------------------------------------


def download_raw(data_dir: Path, plates: list[str] | None = None) -> Path:
    """Fetch the Broad's metadata CSVs and plate zips into data_dir/{bbbc021-metadata,bbbc021-raw}.

    Every file is checked against the SHA-256 manifest shipped with cellmorph
    (datasets/checksums/bbbc021-raw.sha256). A file without a pinned digest is refused unless
    CELLMORPH_TRUST_NEW_DOWNLOADS=1; then its digest is recorded in data_dir/bbbc021-raw/SHA256SUMS
    for the next check (trust on first use) and printed so it can be pinned in the manifest.
    """
    import os
    import zipfile

    data_dir = Path(data_dir)
    manifest = read_manifest("bbbc021-raw")
    trust = os.environ.get("CELLMORPH_TRUST_NEW_DOWNLOADS") == "1"
    meta_dir, raw_dir = data_dir / METADATA_DIR, data_dir / RAW_DIR
    raw_dir.mkdir(parents=True, exist_ok=True)
    recorded = []
    wanted = [(meta_dir, name) for name in (IMAGE_CSV, "BBBC021_v1_compound.csv", MOA_CSV)]
    wanted += [(raw_dir, f"BBBC021_v1_images_{p}.zip") for p in (plates or PLATES)]
    for folder, name in wanted:
        done = folder / name if not name.endswith(".zip") else raw_dir / name.removeprefix("BBBC021_v1_images_").removesuffix(".zip")
        if done.exists():
            continue
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            got = fetch(BASE_URL + name, Path(tmp) / name, sha256=manifest.get(name))
            digest = sha256_file(got)
            if name not in manifest:
                if not trust:
                    raise CellmorphError(
                        f"{name}: no pinned SHA-256 in cellmorph's manifest (got {digest}). Check it against the Broad's "
                        "site and rerun with CELLMORPH_TRUST_NEW_DOWNLOADS=1 to accept and record it."
                    )
                recorded.append(f"{digest}  {name}")
            if name.endswith(".zip"):
                staged = Path(tmp) / "unzipped"
                with zipfile.ZipFile(got) as zf:
                    zf.extractall(staged)
                inner = next((p for p in staged.rglob("*") if p.is_dir() and p.name == done.name), None)
                if inner is None:
                    raise CellmorphError(f"{name}: the archive holds no folder {done.name}; the source layout changed.")
                inner.replace(done)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.move(str(got), done)
    if recorded:
        with open(raw_dir / "SHA256SUMS", "a") as f:
            f.write("\n".join(recorded) + "\n")
    return raw_dir


register_download("bbbc021-raw", download_raw)




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
    """Raw BBBC021 plates -> prepared store in `out` (the generic plate path, cellmorph.data.plates, with the paper's
    settings: DMSO controls, 16-bit, Actin/Tubulin/DAPI as RGB, 2 x 2 crops, near-empty crops dropped). Returns
    prepared.json's content."""
    if fields is None:
        fields = raw_fields(Path(data_dir), images_root, plates)
    check_plates(fields)
    fields = fields.assign(**{ROLE: fields["Metadata_Role"].map({"dmso": "control", "treatment": "treatment"})})
    settings = PlateSettings(channels=CHANNELS, normalise="controls", grid=grid, drop_empty=True, image_size=image_size, bit_depth=16)
    selection = "only the 103 annotated treatments, taxol only Week1 D01-D09 at 0.3/1/3 uM; DMSO wells are the controls"
    return prepare_plate(fields, Path(out), settings, dataset="bbbc021", workers=workers, extra={"selection": selection})


register_prepare("bbbc021", prepare_bbbc021)
