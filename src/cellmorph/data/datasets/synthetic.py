"""Synthetic raw plates in the Broad's BBBC021 layout, for tests and benchmarks (no real data needed).

`write_bbbc021_plate` writes 16-bit TIFFs named like the real ones ("<well>_s<site>_w<n><id>.tif" in a
plate folder) and the matching rows of BBBC021_v1_image.csv / BBBC021_v1_moa.csv, so the whole
`cellmorph prepare bbbc021` path runs on them unchanged.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

CHANNEL_CODES = {"DAPI": "w1", "Tubulin": "w2", "Actin": "w4"}


def synthetic_field(rng: np.random.Generator, shape: tuple[int, int], level: float, cells: int = 12, quadrant: int | None = None) -> np.ndarray:
    """One 16-bit channel: Poisson background around `level` plus bright Gaussian 'cells' (all in one quadrant if given)."""
    h, w = shape
    img = rng.poisson(level, size=shape).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(cells):
        if quadrant is None:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        else:
            cy = rng.uniform(0, h / 2) + (h / 2) * (quadrant // 2)
            cx = rng.uniform(0, w / 2) + (w / 2) * (quadrant % 2)
        r = rng.uniform(0.02, 0.05) * min(h, w)
        img += rng.uniform(5, 20) * level * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 65535).astype(np.uint16)


def write_bbbc021_plate(
    root: Path,
    plate: str = "Week1_00001",
    treatments: dict[str, tuple[str, float, str]] | None = None,
    dmso_wells: tuple[str, ...] = ("B02", "C02"),
    sites: int = 2,
    shape: tuple[int, int] = (64, 80),
    seed: int = 0,
    empty_quadrant_well: str | None = None,
    compress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write one plate folder root/<plate>/ of TIFFs; return (image-table rows, moa rows) in the Broad's columns.

    treatments: well -> (compound, concentration, moa). In `empty_quadrant_well` every cell sits in the
    top-left quadrant, so after the per-field min-max the other three crops are near-empty.
    """
    import tifffile

    treatments = treatments or {"D03": ("taxol", 3.0, "Microtubule stabilizers"), "E05": ("AZ138", 1.0, "Eg5 inhibitors")}
    rng = np.random.default_rng(seed)
    folder = Path(root) / plate
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    levels = {"DAPI": 300.0, "Tubulin": 900.0, "Actin": 1500.0}
    wells = [(w, "DMSO", 0.0) for w in dmso_wells] + [(w, c, x) for w, (c, x, _) in treatments.items()]
    for well, compound, conc in wells:
        for s in range(1, sites + 1):
            row = {"TableNumber": 1, "ImageNumber": len(rows) + 1}
            for ch, code in CHANNEL_CODES.items():
                name = f"{plate.split('_')[0]}_{well}_s{s}_{code}{str(uuid.UUID(int=int(rng.integers(1 << 62)))).upper()}.tif"
                q = 0 if well == empty_quadrant_well else None
                tifffile.imwrite(folder / name, synthetic_field(rng, shape, levels[ch] * (1.3 if compound != "DMSO" else 1.0), quadrant=q),
                                 compression="zlib" if compress else None)
                row[f"Image_FileName_{ch}"] = name
                row[f"Image_PathName_{ch}"] = f"{plate.split('_')[0]}/{plate}"
            row.update({"Image_Metadata_Plate_DAPI": plate, "Image_Metadata_Well_DAPI": well, "Replicate": 1,
                        "Image_Metadata_Compound": compound, "Image_Metadata_Concentration": conc})
            rows.append(row)
    moa = pd.DataFrame([{"compound": c, "concentration": x, "moa": m} for c, x, m in treatments.values()] +
                       [{"compound": "DMSO", "concentration": 0.0, "moa": "DMSO"}])
    return pd.DataFrame(rows), moa


def write_bbbc021_metadata(folder: Path, image: pd.DataFrame, moa: pd.DataFrame) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image.to_csv(folder / "BBBC021_v1_image.csv", index=False)
    moa.drop_duplicates(["compound", "concentration"]).to_csv(folder / "BBBC021_v1_moa.csv", index=False)
