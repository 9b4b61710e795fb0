"""Aggregation as Kensert et al.: image probabilities -> median per replicate well ->
median over the replicate wells of a treatment -> argmax = the treatment's prediction.

The levels a table can be scored at depend on its columns (`available_levels`): nucleus patches
have images only; a screen has wells (per plate) and treatments (compound x concentration)."""

from __future__ import annotations

import pandas as pd

from cellmorph.data.table import TREATMENT_KEYS, WELL_KEYS
from cellmorph.errors import CellmorphError

LEVELS = ("image", "well", "treatment")  # from least to most aggregated
_NEEDS = {"image": [], "well": ["Metadata_Well"], "treatment": ["Metadata_Well", *TREATMENT_KEYS]}


def prob_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("prob_")]


def available_levels(df: pd.DataFrame, requested: str | list[str] | tuple[str, ...] = "auto") -> list[str]:
    """The levels `df` can be scored at, in LEVELS order.

    "auto": image always, well where Metadata_Well exists, treatment where Metadata_Compound and
    Metadata_Concentration exist too. A list: exactly those, or an error naming the missing columns."""
    if requested == "auto":
        return [lv for lv in LEVELS if set(_NEEDS[lv]) <= set(df.columns)]
    wanted = [requested] if isinstance(requested, str) else list(requested)
    unknown = [lv for lv in wanted if lv not in LEVELS]
    if unknown:
        raise CellmorphError(f"unknown level(s) {', '.join(map(repr, unknown))} in evaluation levels: choose from {', '.join(LEVELS)} or \"auto\".")
    for lv in wanted:
        missing = [c for c in _NEEDS[lv] if c not in df.columns]
        if missing:
            raise CellmorphError(
                f"the {lv} level needs the column(s) {', '.join(missing)}, which this dataset's table lacks. "
                f"Score it at {', '.join(available_levels(df))} instead (evaluation levels = \"auto\")."
            )
    return [lv for lv in LEVELS if lv in wanted]


def _keys(df: pd.DataFrame, level: str) -> list[str]:
    seed = ["seed"] if "seed" in df.columns else []  # several seeds in one table: never pooled into one unit
    if level == "well":
        carried = [c for c in TREATMENT_KEYS if c in df.columns]  # kept for the treatment step
        return seed + [c for c in WELL_KEYS if c in df.columns] + carried
    return seed + TREATMENT_KEYS


def aggregate(pred: pd.DataFrame, level: str, label: str, how: str = "median") -> pd.DataFrame:
    """One row per unit of `level`: its key columns, `label`, prob_<class> (median, or mean with
    how="mean"), n (images per well, wells per treatment) and predicted (the argmax class name).

    Treatments are aggregated over their WELL values, as in the paper: images -> wells -> treatments.
    Wells are grouped per plate when Metadata_Plate exists; a "seed" column keeps seeds apart.

    >>> wells = aggregate(pred, "well", "Metadata_MoA")"""
    if how not in ("median", "mean"):
        raise CellmorphError(f"aggregation {how!r} is not known: use \"median\" or \"mean\".")
    available_levels(pred, [level])
    probs = prob_columns(pred)
    if not probs:
        raise CellmorphError("predictions have no prob_<class> columns: nothing to aggregate.")
    if level == "image":
        out = pred.reset_index(drop=True).copy()
        out["n"] = 1
    else:
        rows = aggregate(pred, "well", label, how) if level == "treatment" else pred
        keys = _keys(rows, level) + [label]
        grouped = rows.groupby(keys, sort=True, observed=True, dropna=False)
        out = getattr(grouped[probs], how)()
        out["n"] = grouped.size()
        out = out.reset_index()
    out["predicted"] = [probs[i].removeprefix("prob_") for i in out[probs].to_numpy().argmax(axis=1)]
    return out
