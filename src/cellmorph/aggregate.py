"""Aggregation as Kensert et al.: image probabilities -> median per replicate well ->
median over the replicate wells of a treatment -> argmax = the treatment's prediction."""

from __future__ import annotations

import pandas as pd

WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
TREATMENT_KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def has_treatments(df: pd.DataFrame) -> bool:
    """Whether rows carry plates, wells, compounds and concentrations (a drug screen), so that the
    image -> well -> treatment aggregation applies (nucleus patches, for example, have none)."""
    return set(WELL_KEYS + TREATMENT_KEYS) <= set(df.columns)


def prob_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("prob_")]


def to_wells(pred: pd.DataFrame, label: str = "Metadata_MoA") -> pd.DataFrame:
    probs = prob_columns(pred)
    keys = WELL_KEYS + TREATMENT_KEYS + [label]
    return pred.groupby(keys, sort=True, observed=True)[probs].median().reset_index()


def to_treatments(pred: pd.DataFrame, label: str = "Metadata_MoA") -> pd.DataFrame:
    """One row per treatment (compound, concentration) with median probabilities and the prediction."""
    probs = prob_columns(pred)
    wells = to_wells(pred, label)
    out = wells.groupby(TREATMENT_KEYS + [label], sort=True, observed=True)[probs].median().reset_index()
    out["n_wells"] = wells.groupby(TREATMENT_KEYS + [label], sort=True, observed=True).size().to_numpy()
    out["predicted"] = out[probs].to_numpy().argmax(axis=1)
    out["predicted"] = [probs[i].removeprefix("prob_") for i in out["predicted"]]
    return out
