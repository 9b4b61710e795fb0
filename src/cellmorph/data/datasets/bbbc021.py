"""BBBC021 (Caie et al. 2010; Ljosa et al. 2012): the 6-MoA subset of Kensert et al.'s lab.

Layout under the data folder (as pharmbio/kensert_CNN_lab publishes it, renamed):

    bbbc021-subset/bbbc021v1_labels.csv   ';'-separated: index, compound, concentration, moa, plate, well, replicate
    bbbc021-subset/images/bbbc021v1_N.png RGB = (F-actin, B-tubulin, DAPI), 256x256, already normalised to 8-bit

Row N of the labels file is image N. Every well has 4 consecutive fields of view.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from cellmorph.data.datasets.download import fetch, read_manifest, verify_manifest
from cellmorph.data.registry import register, register_download
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

SUBSET_DIR = "bbbc021-subset"
LABELS = "bbbc021v1_labels.csv"
SUBSET_ARCHIVE_URL = "https://github.com/pharmbio/kensert_CNN_lab/archive/refs/heads/master.zip"
_LABEL_COLUMNS = ["compound", "concentration", "moa", "plate", "well", "replicate"]


@register("bbbc021-subset", "BBBC021 6-MoA subset (660 fields, 18 compounds, 55 treatments; Kensert et al. lab)")
def load_subset(data_dir: Path, label: str = "Metadata_MoA") -> ImageTable:
    root = Path(data_dir) / SUBSET_DIR
    if not root.is_dir() and (Path(data_dir) / LABELS).is_file():
        root = Path(data_dir)  # the data folder is the subset folder itself
    labels_path = root / LABELS
    if not labels_path.is_file():
        raise CellmorphError(
            f"{labels_path}: labels file not found. Point --data/CELLMORPH_DATA at the folder holding "
            f"{SUBSET_DIR}/, or fetch it with `cellmorph download bbbc021-subset --data DIR`."
        )
    try:
        raw = pd.read_csv(labels_path, sep=";", index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CellmorphError(f"{labels_path}: cannot be read as a ';'-separated table ({err}).") from None
    missing = [c for c in _LABEL_COLUMNS if c not in raw.columns]
    if missing:
        raise CellmorphError(
            f"{labels_path}: missing column(s) {missing}; expected {_LABEL_COLUMNS} after the index column. "
            "Restore the original file (`cellmorph download bbbc021-subset`)."
        )
    df = pd.DataFrame(
        {
            "Metadata_ImageNumber": raw.index.astype(int),
            "Metadata_Plate": raw["plate"].astype(str),
            "Metadata_Well": raw["well"].astype(str),
            "Metadata_Compound": raw["compound"].astype(str),
            "Metadata_Concentration": raw["concentration"].astype(float),
            "Metadata_Replicate": raw["replicate"].astype(int),
            "Metadata_Batch": raw["plate"].astype(str).str.split("_").str[0],
            "Metadata_MoA": raw["moa"].astype(str),
        }
    )
    df["Metadata_Site"] = df.groupby(["Metadata_Plate", "Metadata_Well"]).cumcount() + 1
    df["Image_Path_RGB"] = [str(root / "images" / f"bbbc021v1_{i}.png") for i in df["Metadata_ImageNumber"]]
    return ImageTable(df, name="bbbc021-subset", label=label, source=str(labels_path))


def download_subset(data_dir: Path) -> Path:
    """Fetch the subset from its public source into data_dir/bbbc021-subset, checking every file.

    The archive holds bbbc021v1_labels.csv and bbbc021v1_images/; each file is checked against the
    SHA-256 manifest shipped with cellmorph before the folder is moved into place.
    """
    data_dir = Path(data_dir)
    target = data_dir / SUBSET_DIR
    manifest = read_manifest(SUBSET_DIR)
    if target.is_dir() and not verify_manifest(target, manifest):
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        tmp = Path(tmp)
        archive = fetch(SUBSET_ARCHIVE_URL, tmp / "archive.zip")
        staged = tmp / SUBSET_DIR
        (staged / "images").mkdir(parents=True)
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                name = Path(member).name
                if member.endswith("/" + LABELS):
                    dest = staged / LABELS
                elif "/bbbc021v1_images/" in member and name.endswith(".png"):
                    dest = staged / "images" / name
                else:
                    continue
                with zf.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        bad = verify_manifest(staged, manifest)
        if bad:
            raise CellmorphError(f"downloaded bbbc021-subset failed its checksums for {len(bad)} file(s), e.g. {bad[:3]}.")
        if target.exists():
            shutil.rmtree(target)
        staged.replace(target)
    return target


register_download("bbbc021-subset", download_subset)
