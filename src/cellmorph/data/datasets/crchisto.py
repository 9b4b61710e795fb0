"""CRCHistoPhenotypes (Sirinukunwattana et al., IEEE TMI 2016): nuclei in H&E colorectal adenocarcinoma.

Layout under the data folder (as the public release lays it out, images converted losslessly to PNG):

    crchistophenotypes/imgN/imgN.png                  500 x 500 RGB H&E image, N = 1..100
    crchistophenotypes/imgN/imgN_<class>.mat          MATLAB file, key `detection`: K x 2 array of nucleus
                                                      centres (x = column, y = row, 1-based, sub-pixel)
                                                      for class epithelial, fibroblast, inflammatory, others

One table row per labelled nucleus; the store cuts a `patch_size` x `patch_size` patch centred on each
nucleus (32 x 32 by default, as Bayramoglu & Heikkilae 2016), mirror-padded at the image borders.
The "others" (miscellaneous) class is left out by default, as in that paper: epithelial 7,722,
fibroblast 5,712, inflammatory 6,971 = 20,405 nuclei.

The data is "released for research purpose only"; cite Sirinukunwattana et al. 2016 (see Readme.txt).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cellmorph.data.registry import register
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

DATA_DIR = "crchistophenotypes"
CLASSES = ("epithelial", "fibroblast", "inflammatory")
OTHERS = "others"
LABEL = "Metadata_Label"
# The columns a nucleus table must fill (instead of the drug-screen plate/well/compound columns).
REQUIRED = ("Metadata_Image", "Metadata_Center_X", "Metadata_Center_Y")


def read_centres(mat_path: Path) -> np.ndarray:
    """The K x 2 (x, y) 1-based centres of one .mat file (K may be 0)."""
    from scipy.io import loadmat

    try:
        det = loadmat(mat_path)["detection"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CellmorphError(f"{mat_path}: cannot read the 'detection' array ({type(err).__name__}: {err}). Restore the original file.") from None
    det = np.asarray(det, dtype=np.float64)
    if det.size == 0:
        return np.zeros((0, 2))
    if det.ndim != 2 or det.shape[1] != 2:
        raise CellmorphError(f"{mat_path}: 'detection' has shape {det.shape}; expected K x 2 (x, y).")
    return det


@register("crchisto", "CRCHistoPhenotypes nuclei in H&E (22,444 labelled; 3 classes, 20,405 without 'others'); 32x32 patches")
def load_crchisto(data_dir: Path, label: str = LABEL, patch_size: int = 32, include_others: bool = False, max_images: int = 0) -> ImageTable:
    """Options (dataset.options): patch_size (pixels, default 32), include_others (the miscellaneous
    class, default false), max_images (only img1..imgN, 0 = all 100; for smoke tests)."""
    root = Path(data_dir) / DATA_DIR
    if not root.is_dir() and (Path(data_dir) / "img1").is_dir():
        root = Path(data_dir)  # the data folder is the dataset folder itself
    if label != LABEL:
        raise CellmorphError(f"dataset 'crchisto' keeps the nucleus class in '{LABEL}'; set dataset.label = \"{LABEL}\" (got '{label}').")
    if not isinstance(patch_size, int) or patch_size < 4:
        raise CellmorphError(f"dataset 'crchisto': dataset.options.patch_size must be an integer >= 4 (got {patch_size!r}).")
    folders = sorted((p for p in root.glob("img*") if p.is_dir() and p.name[3:].isdigit()), key=lambda p: int(p.name[3:]))
    if not folders:
        raise CellmorphError(
            f"{root}: no imgN/ folders found. Point --data/CELLMORPH_DATA at the folder holding {DATA_DIR}/ "
            "(CRCHistoPhenotypes_2016_04_28 from the University of Warwick TIA lab, images as imgN/imgN.png)."
        )
    if max_images:
        folders = folders[:max_images]
    classes = CLASSES + ((OTHERS,) if include_others else ())
    parts = []
    for folder in folders:
        n = int(folder.name[3:])
        image = folder / f"{folder.name}.png"
        if not image.is_file():
            raise CellmorphError(f"{image}: image file not found (every imgN/ folder holds imgN.png).")
        with Image.open(image) as im:  # reads the header only
            width, height = im.size
        for cls in classes:
            mat = folder / f"{folder.name}_{cls}.mat"
            if not mat.is_file():
                raise CellmorphError(f"{mat}: annotation file not found. Restore the dataset folder {root}.")
            xy = read_centres(mat)
            parts.append(
                pd.DataFrame(
                    {
                        "Metadata_Image": folder.name,
                        "Metadata_ImageNumber": n,
                        "Metadata_Nucleus": np.arange(len(xy)),
                        "Metadata_X": xy[:, 0],
                        "Metadata_Y": xy[:, 1],
                        # 0-based pixel column/row of the centre: x, y are 1-based sub-pixel positions
                        # (a few lie within half a pixel of the border, e.g. x = 0.4: clipped onto it).
                        "Metadata_Center_X": np.clip(np.rint(xy[:, 0]).astype(int) - 1, 0, width - 1),
                        "Metadata_Center_Y": np.clip(np.rint(xy[:, 1]).astype(int) - 1, 0, height - 1),
                        LABEL: cls,
                        "Image_Path_HE": str(image),
                    }
                )
            )
    df = pd.concat(parts, ignore_index=True)
    return ImageTable(df, name="crchisto", label=LABEL, source=str(root), required=REQUIRED, patch_size=patch_size)
