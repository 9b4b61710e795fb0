"""BBBC014 (Ilya Ravkin): NF-kB (p65) cytoplasm-to-nucleus translocation after TNF-alpha, two cell lines.

Layout under the data folder (the Broad's BBBC014_v1_images.zip unpacked, plus the plate map):

    bbbc014/Channel 1-NN-R-CC-00.BMP   FITC (the NF-kB reporter), 1360x1024, 8-bit; NN = well number 01-96
    bbbc014/Channel 2-NN-R-CC-00.BMP   DAPI (nuclei)
    bbbc014/BBBC014_v1_platemap_all.txt   optional: one TNF-alpha concentration per well ("10^-7" ...), well order

(File names are matched loosely: "Channel1-01-A-01.tif" works too, any of .bmp/.tif/.tiff/.png.)
The plate: 12 TNF-alpha concentrations along the columns, highest in column 01, lowest in column 12;
rows A-D MCF7, rows E-H A549. Labels as Kensert et al. (2019): the 4 highest concentrations (columns
01-04) "translocated", the 4 lowest (columns 09-12) "not translocated", columns 05-08 "middle".
Cross-validation: one cell line out (2 folds).

The images are not available offline; `download_bbbc014` fetches them (SHA-256 checked) and the
tests run this loader on a synthetic plate written in the same layout.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.datasets.bbbc013 import LABEL, translocation_label
from cellmorph.data.datasets.download import fetch, read_manifest, sha256_file
from cellmorph.data.registry import register, register_download, register_prepare
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

FOLDER = "bbbc014"
PLATEMAP = "BBBC014_v1_platemap_all.txt"
CHANNELS = ("FITC", "DAPI")  # Channel 1, Channel 2
URLS = {
    "BBBC014_v1_images.zip": "https://data.broadinstitute.org/bbbc/BBBC014/BBBC014_v1_images.zip",
    PLATEMAP: "https://data.broadinstitute.org/bbbc/BBBC014/BBBC014_v1_platemap_all.txt",
}
_NAME = re.compile(r"^Channel\s*([12])-(\d{1,2})-([A-H])-(\d{2})(?:-\d+)?\.(bmp|tif|tiff|png)$", re.IGNORECASE)


def read_platemap(path: Path) -> list[float]:
    """96 concentrations (molar) in well order A01..A12, B01.. from the Broad's plate map."""
    text = path.read_bytes().decode("latin-1")
    values = []
    for tok in re.findall(r"10\s*\^\s*(-?\d+(?:\.\d+)?)|(\d+(?:\.\d+)?[eE]-?\d+)", text):
        values.append(10 ** float(tok[0]) if tok[0] else float(tok[1]))
    if len(values) != 96:
        raise CellmorphError(f"{path}: expected 96 concentrations (one per well, like '10^-7'), found {len(values)}.")
    return values


@register("bbbc014", "BBBC014 NF-kB translocation, MCF7 + A549, FITC + DAPI (prepare it: `cellmorph prepare bbbc014`)")
def load_bbbc014(data_dir: Path, label: str = LABEL) -> ImageTable:
    label = LABEL if label == "Metadata_MoA" else label  # the config default names the MoA column; here it is the translocation label
    root = Path(data_dir) / FOLDER
    if not root.is_dir():
        raise CellmorphError(f"{root}: BBBC014 folder not found. Fetch it with `cellmorph download bbbc014 --data DIR`.")
    files: dict[tuple[str, int], dict[str, str]] = {}
    for p in sorted(root.rglob("*")):
        m = _NAME.match(p.name)
        if m and p.is_file():
            ch, _, r, c = m.group(1), m.group(2), m.group(3).upper(), int(m.group(4))
            files.setdefault((r, c), {})[CHANNELS[int(ch) - 1]] = str(p)
    wells = [(r, c) for r in "ABCDEFGH" for c in range(1, 13)]
    absent = [f"{r}{c:02d}" for r, c in wells if len(files.get((r, c), {})) < 2]
    if absent:
        raise CellmorphError(
            f"{root}: {len(absent)} of 96 wells lack a Channel 1 or Channel 2 image (e.g. {absent[:5]}). Files must be "
            "named like 'Channel 1-01-A-01-00.BMP' (channel, well number, row, column). Re-unpack BBBC014_v1_images.zip."
        )
    col = pd.Series([c for _, c in wells])
    row = pd.Series([r for r, _ in wells])
    if (root / PLATEMAP).is_file():
        conc = pd.Series(read_platemap(root / PLATEMAP))
    else:  # the layout without the map: concentration rank only (column 01 highest)
        conc = (13 - col).astype(float)
    rank = (12 - col).astype(int)  # 0 = lowest (column 12) ... 11 = highest (column 01)
    line = row.map(lambda r: "MCF7" if r in "ABCD" else "A549")
    df = pd.DataFrame(
        {
            "Metadata_Plate": "BBBC014",
            "Metadata_Well": row + col.map("{:02d}".format),
            "Metadata_Row": row,
            "Metadata_Column": col,
            "Metadata_Site": 1,
            "Metadata_Compound": "TNF-alpha",
            "Metadata_Concentration": conc,
            "Metadata_Dose": rank,
            "Metadata_CellLine": line,
            "Metadata_Control": np.where(col == 1, "positive", np.where(col == 12, "negative", "dose series")),
            "Metadata_Fold": row.map(lambda r: 0 if r in "ABCD" else 1),
            LABEL: translocation_label(rank, 12),
        }
    )
    for ch in CHANNELS:
        df[f"Image_Path_{ch}"] = [files[w][ch] for w in wells]
    return ImageTable(df, name="bbbc014", label=label, source=str(root))


def download_bbbc014(data_dir: Path) -> Path:
    """Fetch the images zip and plate map into data_dir/bbbc014, checked against the shipped SHA-256 manifest
    (datasets/checksums/bbbc014.sha256); unpinned files need CELLMORPH_TRUST_NEW_DOWNLOADS=1 (see bbbc021_raw)."""
    import os

    target = Path(data_dir) / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(FOLDER)
    trust = os.environ.get("CELLMORPH_TRUST_NEW_DOWNLOADS") == "1"
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        for name, url in URLS.items():
            got = fetch(url, Path(tmp) / name, sha256=manifest.get(name))
            if name not in manifest and not trust:
                raise CellmorphError(
                    f"{name}: no pinned SHA-256 in cellmorph's manifest (got {sha256_file(got)}). Check it and rerun with "
                    "CELLMORPH_TRUST_NEW_DOWNLOADS=1 to accept it."
                )
            if name.endswith(".zip"):
                with zipfile.ZipFile(got) as zf:
                    for member in zf.namelist():
                        if _NAME.match(Path(member).name):
                            (target / Path(member).name).write_bytes(zf.read(member))
            else:
                got.replace(target / name)
    return target


def _prepare_bbbc014(data_dir: Path, out: Path, workers: int | None = None) -> dict:
    from cellmorph.data.datasets.translocation import prepare_translocation

    return prepare_translocation("bbbc014", data_dir, out, workers=workers)


register_prepare("bbbc014", _prepare_bbbc014)

register_download("bbbc014", download_bbbc014)
