"""Profile tables: the file names a run's profiles are written under, which columns are metadata and which
features, reading a table (parquet, CSV, a run folder), annotating a BBBC021 CellProfiler table, checking a
table before it is evaluated, and aggregating images to well and treatment profiles.

Feature columns are named `Image_CNN_<model>_NNNN`: whole-field embeddings are image-level features, so
pycytominer infers them with `image_features=True` (its default `infer` looks for Cells_/Nuclei_/
Cytoplasm_ only); every pycytominer call in this package names the features explicitly.

Well and treatment profiles come from `evaluation.aggregate.aggregate_units`, the package's one
aggregation (the same units and medians as the predictions'), with the features cast to float64 as
`pycytominer.aggregate` casts them: on the BBBC021 subset's embeddings and the Ljosa et al. table the
tables equal pycytominer's to the last bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.evaluation.aggregate import WELL_KEYS, aggregate_units, unit_keys
from cellmorph.data.table import labelled_values

EMBEDDINGS = "embeddings.parquet"
WELL_PROFILES = "profiles_well.parquet"
TREATMENT_PROFILES = "profiles_treatment.parquet"
METRICS = "profile_metrics.json"
PLOT = "profiles.png"
PROFILE_FILES = (EMBEDDINGS, WELL_PROFILES, TREATMENT_PROFILES, METRICS, PLOT)

COMPOUND, CONCENTRATION, MOA, BATCH = "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Metadata_Batch"

__all__ = [
    "BATCH", "COMPOUND", "CONCENTRATION", "EMBEDDINGS", "METRICS", "MOA", "PLOT", "PROFILE_FILES", "TREATMENT_PROFILES", "WELL_KEYS", "WELL_PROFILES",
    "aggregate_profiles", "annotate_bbbc021", "check_profile_table", "feature_columns", "feature_prefix", "is_control", "is_metadata",
    "read_profiles", "well_and_treatment_profiles",
]


def feature_prefix(model: str) -> str:
    return f"Image_CNN_{model}_"


def is_metadata(col: str) -> bool:
    """`Metadata_*` (pycytominer's convention) or CellProfiler's `Image_Metadata_*`."""
    return col.startswith("Metadata_") or "_Metadata_" in col


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are not metadata: the profile's features."""
    return [c for c in df.columns if not is_metadata(c) and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


def _constant_within(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Metadata columns with one value per group of `keys` (carried into the aggregated profile)."""
    meta = [c for c in df.columns if is_metadata(c) and c not in keys]
    if not meta:
        return []
    n = df.groupby(keys, dropna=False, observed=True)[meta].nunique(dropna=False).max()
    return [c for c in meta if n[c] <= 1]


def aggregate_profiles(df: pd.DataFrame, level: str, features: list[str] | None = None, count: str | None = None) -> pd.DataFrame:
    """Median profile per well (per plate) or per treatment (median of its wells' medians) by
    `evaluation.aggregate.aggregate_units`, the features as float64; metadata constant within a unit is
    kept, `count` (e.g. "Metadata_Images") holds the rows per well or the wells per treatment.

    >>> wells = aggregate_profiles(embeddings, "well", count="Metadata_Images")"""
    features = features or feature_columns(df)
    keys = unit_keys(df, level)
    carry = _constant_within(df, keys)
    table = pd.concat([df.drop(columns=features), df[features].astype(np.float64)], axis=1)  # as pycytominer.aggregate casts them
    units, _ = aggregate_units(table, level, features, "median", carry, count or "Metadata__Count")
    return units[keys + carry + ([count] if count else []) + features]


def well_and_treatment_profiles(emb: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images -> wells (median per plate and well) -> treatments (median over the wells), as the paper
    aggregates predictions; only tables with plates, wells, compounds and concentrations have both."""
    need = WELL_KEYS + [COMPOUND, CONCENTRATION]
    missing = [c for c in need if c not in emb.columns]
    if missing:
        raise CellmorphError(f"embeddings lack the column(s) {missing}: wells and treatments cannot be formed (the dataset has no plate/well/compound/concentration metadata).")
    feats = feature_columns(emb)
    return aggregate_profiles(emb, "well", feats, count="Metadata_Images"), aggregate_profiles(emb, "treatment", feats, count="Metadata_Wells")


def read_profiles(path: str | Path) -> pd.DataFrame:
    """A profile table: parquet or CSV (.csv, .csv.gz), or a run folder (its profiles_well.parquet)."""
    path = Path(path)
    if path.is_dir():
        if (path / WELL_PROFILES).is_file():
            path = path / WELL_PROFILES
        else:
            raise CellmorphError(f"{path}: no {WELL_PROFILES} here. Write it first with `cellmorph embed {path}`, or pass a profile table (parquet or CSV).")
    if not path.is_file():
        raise CellmorphError(f"{path}: no such profile table. Pass a parquet or CSV file of per-well profiles, or a run folder after `cellmorph embed`.")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault
        raise CellmorphError(f"{path}: cannot be read as a {'parquet' if path.suffix == '.parquet' else 'CSV'} table ({type(err).__name__}: {err}).") from None


def annotate_bbbc021(profiles: pd.DataFrame, metadata_dir: str | Path) -> pd.DataFrame:
    """Add Metadata_Plate/Well/Compound/Concentration/MoA/Batch to a BBBC021 per-well table keyed by
    CellProfiler's Image_Metadata_Plate and Image_Metadata_Well (e.g. the Ljosa et al. 2013 table), from
    BBBC021_v1_image.csv.gz (plate, well -> compound, concentration) and BBBC021_v1_moa.csv (-> MoA).
    Batch = the week of the plate's name (Week4_27481 -> Week4)."""
    d = Path(metadata_dir)
    image_csv = next((d / n for n in ("BBBC021_v1_image.csv.gz", "BBBC021_v1_image.csv") if (d / n).is_file()), None)
    moa_csv = d / "BBBC021_v1_moa.csv"
    if image_csv is None or not moa_csv.is_file():
        raise CellmorphError(f"--bbbc021-metadata {d}: expected BBBC021_v1_image.csv(.gz) and BBBC021_v1_moa.csv there (the Broad's BBBC021 metadata).")
    keys = {"Image_Metadata_Plate": "Metadata_Plate", "Image_Metadata_Well": "Metadata_Well"}
    missing = [k for k in keys if k not in profiles.columns and keys[k] not in profiles.columns]
    if missing:
        raise CellmorphError(f"the profile table lacks {missing}: --bbbc021-metadata annotates tables keyed by plate and well (Image_Metadata_Plate/Well or Metadata_Plate/Well).")
    prof = profiles.rename(columns={k: v for k, v in keys.items() if v not in profiles.columns})
    im = pd.read_csv(image_csv, usecols=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Image_Metadata_Compound", "Image_Metadata_Concentration"])
    wells = im.drop_duplicates().rename(columns={"Image_Metadata_Plate_DAPI": "Metadata_Plate", "Image_Metadata_Well_DAPI": "Metadata_Well",
                                                 "Image_Metadata_Compound": COMPOUND, "Image_Metadata_Concentration": CONCENTRATION})
    moa = pd.read_csv(moa_csv).rename(columns={"compound": COMPOUND, "concentration": CONCENTRATION, "moa": MOA})
    prof = prof.drop(columns=[c for c in (COMPOUND, CONCENTRATION, MOA, BATCH) if c in prof.columns])
    out = prof.merge(wells, on=WELL_KEYS, how="left").merge(moa, on=[COMPOUND, CONCENTRATION], how="left").copy()
    unmatched = int(out[COMPOUND].isna().sum())
    if unmatched == len(out):
        raise CellmorphError(f"no plate/well of the profile table is in {image_csv}: is it a BBBC021 table?")
    out[BATCH] = out["Metadata_Plate"].astype(str).str.split("_").str[0]
    meta = [c for c in out.columns if is_metadata(c)]
    return out[meta + [c for c in out.columns if c not in meta]]


def is_control(df: pd.DataFrame, control: str) -> pd.Series:
    """Rows whose compound (or MoA) is the control, e.g. DMSO."""
    c = pd.Series(False, index=df.index)
    for col in (COMPOUND, MOA):
        if col in df.columns:
            c |= df[col].astype(str) == control
    return c


def check_profile_table(df: pd.DataFrame, source: str, control: str = "DMSO") -> list[str]:
    """The feature columns of a profile table, or a one-line error naming what is missing and the fix."""
    missing = [c for c in (COMPOUND, MOA) if c not in df.columns]
    if missing:
        raise CellmorphError(
            f"{source}: the profile table lacks {' and '.join(missing)}; NSC/NSCB and mAP compare MoAs across compounds. Add those columns, "
            "or for a BBBC021 table keyed by plate and well pass --bbbc021-metadata DIR (the folder of BBBC021_v1_image.csv.gz and BBBC021_v1_moa.csv)."
        )
    feats = feature_columns(df)
    if not feats:
        raise CellmorphError(f"{source}: no numeric feature columns (every column is Metadata_* or not a number).")
    values = df[feats].to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        raise CellmorphError(f"{source}: every feature value is NaN or infinite ({len(feats)} feature columns, {len(df)} rows): nothing to compare. Check how the table was written.")
    lab = labelled_values(df[MOA]) & ~is_control(df, control)
    moas = df.loc[lab, MOA].astype(str).unique()
    if len(moas) < 2:
        raise CellmorphError(f"{source}: {len(moas)} MoA ({', '.join(moas) or 'none'}) among the non-{control} rows: MoA matching needs at least 2 MoAs (and 2 compounds of one MoA for a positive).")
    return feats
