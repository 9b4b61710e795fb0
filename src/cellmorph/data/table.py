"""ImageTable: one row per field of view (or per nucleus patch), CellProfiler-style columns.

Metadata columns follow CellProfiler/pycytominer (`Metadata_Plate`, `Metadata_Well`, ...).
Image files are named by `Image_Path_<Channel>` columns holding absolute paths; a file may
hold one grey channel or several (an RGB PNG holds three). The label column may be empty in some
rows: those are predicted, never trained on or scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.omezarr import is_zarr_ref, zarr_ref_exists
from cellmorph.errors import CellmorphError

REQUIRED = ("Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration")
PATH_PREFIX = "Image_Path_"
WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]  # a well is a (plate, well) pair
TREATMENT_KEYS = ["Metadata_Compound", "Metadata_Concentration"]  # a treatment is a (compound, concentration) pair
UNLABELLED_WORDS = ("", "nan", "none", "null")  # label values that mean "no label" (after strip, any case)


def labelled_mask(df: pd.DataFrame, label: str) -> np.ndarray:
    """The one definition of a labelled row: the label is present and not an empty-looking word (NaN,
    None, "", "nan", "none", "null", any case, surrounding spaces ignored). Unlabelled rows are
    predicted, never trained on or scored (e.g. the middle doses of a dose series).

    >>> labelled_mask(pd.DataFrame({"m": ["DNA damage", "", None, "nan"]}), "m").tolist()
    [True, False, False, False]"""
    return labelled_values(df[label]).to_numpy()


def labelled_values(values: pd.Series) -> pd.Series:
    """labelled_mask of one column, as a boolean Series on its index."""
    return values.notna() & ~values.astype(str).str.strip().str.lower().isin(UNLABELLED_WORDS)


def labelled_rows(df: pd.DataFrame, label: str) -> pd.DataFrame:
    """The labelled rows of `df` (labelled_mask), their label as str; a missing label column is an error
    naming the columns there are."""
    if label not in df.columns:
        raise CellmorphError(f"predictions have no label column {label!r} (columns: {', '.join(df.columns)}). Check dataset.label in the config.")
    out = df[labelled_mask(df, label)].copy()
    out[label] = out[label].astype(object).map(str)
    return out


def has_treatments(df: pd.DataFrame) -> bool:
    """Whether rows carry plates, wells, compounds and concentrations (a drug screen), so that the
    image -> well -> treatment aggregation applies (nucleus patches, for example, have none)."""
    return set(WELL_KEYS + TREATMENT_KEYS) <= set(df.columns)


@dataclass
class ImageTable:
    """A validated table of images: `df` has Metadata_* and Image_Path_* columns."""

    df: pd.DataFrame
    name: str
    label: str = "Metadata_MoA"
    source: str = "<table>"
    # The columns every row must fill, besides the image paths. Drug screens need plate/well/compound/
    # concentration; a table of nucleus patches (datasets/crchisto.py) needs its image and centre columns
    # instead; a user's own table (datasets/folder.py) none. The label column must exist but may be empty
    # in some rows (see `classes`).
    required: tuple[str, ...] = REQUIRED
    # > 0: each row is a patch_size x patch_size patch centred on (Metadata_Center_X, Metadata_Center_Y)
    # (0-based pixel column and row) of its image, not the whole image (see store.py).
    patch_size: int = 0
    # A prepared store (`cellmorph prepare`): the images are already decoded there, one row per image.
    store_dir: str | None = None
    # False: a table of images to predict (new images), which may lack the label column; `labelled` says whether it
    # has labels. Training and cross-validation refuse a table without them, naming the column.
    needs_label: bool = True

    def __post_init__(self) -> None:
        self.df = self.df.reset_index(drop=True)
        if self.label in self.df.columns:  # "DNA damage " is "DNA damage" (a missing column: validate says so)
            self.df[self.label] = self.df[self.label].map(lambda v: v.strip() if isinstance(v, str) else v)
        self.validate()

    @property
    def path_columns(self) -> list[str]:
        return [c for c in self.df.columns if c.startswith(PATH_PREFIX)]

    @property
    def classes(self) -> list[str]:
        """Sorted names of the non-empty labels: the model's output order. Rows with an empty label
        (e.g. the middle doses of a dose series) are predicted but never trained on or scored."""
        if self.label not in self.df.columns:
            return []
        return sorted(self.df.loc[labelled_mask(self.df, self.label), self.label].astype(str).unique())

    @property
    def labelled(self) -> bool:
        """Whether the table has its label column with at least one labelled row (a table of new images to predict
        may have none)."""
        return self.label in self.df.columns and bool(labelled_mask(self.df, self.label).any())

    def __len__(self) -> int:
        return len(self.df)

    def validate(self) -> None:
        missing = [c for c in (*self.required, *([self.label] if self.needs_label else [])) if c not in self.df.columns]
        if missing:
            raise CellmorphError(
                f"{self.source}: missing column(s) {missing}. The table needs "
                f"{f'{list(self.required)} and ' if self.required else ''}the label column '{self.label}' "
                f"(present: {list(self.df.columns)}). Add or rename the columns."
            )
        if not self.path_columns and self.store_dir is None:
            raise CellmorphError(
                f"{self.source}: no image path column. Name one column per image file "
                f"'{PATH_PREFIX}<Channel>' (e.g. Image_Path_DAPI)."
            )
        if len(self.df) == 0:
            raise CellmorphError(f"{self.source}: the table has no rows.")
        for col in (*self.required, *self.path_columns):
            bad = self.df[col].isna()
            if bad.any():
                rows = list(self.df.index[bad][:5])
                raise CellmorphError(f"{self.source}: column '{col}' is empty in row(s) {rows}. Fill it in or drop those rows.")
        self._check_spellings()
        self._check_duplicate_rows()
        if self.needs_label and len(self.classes) < 2:
            raise CellmorphError(
                f"{self.source}: label column '{self.label}' has fewer than 2 classes among its labelled rows "
                f"({self.classes}); nothing to classify. Rows with an empty label are only predicted."
            )

    def _check_spellings(self) -> None:
        """Labels that differ only in case or inner spaces ('DNA damage' / 'dna damage' / 'DNA  damage') would be
        separate classes: an error listing them."""
        variants: dict[str, set[str]] = {}
        if self.label not in self.df.columns:
            return
        for v in self.df.loc[labelled_mask(self.df, self.label), self.label].astype(str).unique():
            variants.setdefault(" ".join(v.split()).casefold(), set()).add(v)
        for spellings in variants.values():
            if len(spellings) > 1:
                raise CellmorphError(
                    f"labels differ only in case or spaces: {' / '.join(map(repr, sorted(spellings)))} "
                    f"(column {self.label} in {self.source}); make them one spelling"
                )

    def _check_duplicate_rows(self) -> None:
        """A row equal to an earlier one in every column is the same image listed twice: it would be trained on and
        scored twice. (Several rows may name one image when they differ elsewhere, e.g. nuclei of one H&E tile.)"""
        if self.store_dir is not None:
            return
        repeats = self.df.duplicated(keep="first")
        if not repeats.any():
            return
        row = int(self.df.index[repeats][0])
        group = self.df.groupby(list(self.df.columns), dropna=False, sort=False).ngroup()
        original = int(group.index[group == group[row]][0])
        col = self.path_columns[0]
        raise CellmorphError(
            f"{self.source}: row {row} repeats row {original} in every column ({col} {self.df.at[row, col]}); "
            "each image may be listed once: remove the duplicate row(s)"
        )

    def check_files_exist(self) -> None:
        if self.store_dir is not None:
            return
        for col in self.path_columns:
            for p in self.df[col]:
                if not (zarr_ref_exists(p) if is_zarr_ref(p) else Path(p).is_file()):
                    raise CellmorphError(
                        f"{self.source}: image file {p} (column {col}) does not exist. "
                        "Check the data folder (--data or CELLMORPH_DATA) and the table's paths."
                    )

    @property
    def has_treatments(self) -> bool:
        """Whether rows carry compounds and concentrations (a drug screen), so that treatment-level
        aggregation means something."""
        return has_treatments(self.df)
