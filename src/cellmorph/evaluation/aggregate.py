"""Aggregation as Kensert et al.: image probabilities -> median per replicate well ->
median over the replicate wells of a treatment -> argmax = the treatment's prediction.

The one definition of the units and of aggregating to them: `unit_keys` names a unit's columns,
`aggregate_units` takes any numeric columns (probabilities, image features, profiles) to wells or
treatments; `aggregate` (predictions), novelty's unit profiles and profiling's well and treatment
profiles all use it. The levels a table can be scored at depend on its columns (`available_levels`):
nucleus patches have images only; a screen has wells (per plate) and treatments (compound x
concentration)."""

from __future__ import annotations

import numpy as np
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


def unit_keys(df: pd.DataFrame, level: str) -> list[str]:
    """The columns of `df` that identify a unit of `level` ("well" or "treatment").

    A well is Metadata_Plate (where present) and Metadata_Well, carrying Metadata_Compound and
    Metadata_Concentration (where present) for the treatment step; a treatment is Metadata_Compound and
    Metadata_Concentration. A "seed" column comes first: several seeds in one table are never pooled.

    >>> unit_keys(pred, "well")
    ['Metadata_Plate', 'Metadata_Well', 'Metadata_Compound', 'Metadata_Concentration']"""
    seed = ["seed"] if "seed" in df.columns else []  # several seeds in one table: never pooled into one unit
    if level == "well":
        carried = [c for c in TREATMENT_KEYS if c in df.columns]  # kept for the treatment step
        return seed + [c for c in WELL_KEYS if c in df.columns] + carried
    if level == "treatment":
        return seed + TREATMENT_KEYS
    raise CellmorphError(f"units are wells or treatments, not {level!r}.")


def aggregate_units(df: pd.DataFrame, level: str, columns: list[str], how: str = "median", carry: list[str] | tuple[str, ...] = (),
                    count: str = "n") -> tuple[pd.DataFrame, np.ndarray]:
    """Any numeric `columns` of a per-image table aggregated to `level`: wells (per plate) take the median
    (or with how="mean" the mean) of their rows, treatments the median (mean) of their wells' values.

    `carry`: more columns to keep, each constant within a unit (e.g. the label); they join the unit's
    keys. Columns are aggregated in their own dtype (cast them first for another one).

    Returns (units, unit_of_row): one row per unit, sorted by its keys, holding the key and carried
    columns, `columns` and `count` (rows per well, wells per treatment); and the position in `units` of
    each row of `df`.

    >>> wells, unit_of_row = aggregate_units(pred, "well", prob_columns(pred), carry=["Metadata_MoA"])"""
    _check(level, how)
    wells, row_well = _group(df, unit_keys(df, "well"), carry, columns, how, count if level == "well" else "n")
    if level == "well":
        return wells, row_well
    treatments, well_treatment = _group(wells.drop(columns=["n"]), unit_keys(wells, "treatment"), carry, columns, how, count)
    return treatments, well_treatment[row_well]


def _check(level: str, how: str) -> None:
    if how not in ("median", "mean"):
        raise CellmorphError(f"aggregation {how!r} is not known: use \"median\" or \"mean\".")
    if level not in ("well", "treatment"):
        raise CellmorphError(f"units are wells or treatments, not {level!r}.")


def _grouped(df: pd.DataFrame, keys: list[str], carry):
    """`df` grouped by a unit's keys and the carried columns: sorted by them, missing keys kept as a unit."""
    return df.groupby(keys + [c for c in carry if c not in keys], sort=True, observed=True, dropna=False)


def _group(df: pd.DataFrame, keys: list[str], carry, columns: list[str], how: str, count: str) -> tuple[pd.DataFrame, np.ndarray]:
    grouped = _grouped(df, keys, carry)
    units = pd.concat([getattr(grouped[columns], how)(), grouped.size().rename(count)], axis=1)
    return units.reset_index(), grouped.ngroup().to_numpy()


def aggregate_matrix(df: pd.DataFrame, level: str, values: np.ndarray, how: str = "median", carry: list[str] | tuple[str, ...] = ()
                     ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """`aggregate_units` for a matrix of per-row values (image features: 1,280 per image) kept out of the table: the
    same units and the same float64 numbers in the same order, the values reduced a few columns at a time, so a
    screen's features are never copied whole (as a float64 DataFrame they cost ~10 KB per image, several times).

    Returns (units, profiles, unit_of_row): units holds the key and carried columns and n; profiles is
    len(units) x values.shape[1] float64.

    >>> wells, profiles, unit_of_row = aggregate_matrix(pred, "well", features, carry=["Metadata_MoA"])"""
    _check(level, how)
    wells, row_well = _group_keys(df, unit_keys(df, "well"), carry)
    well_values = _reduce(values, row_well, len(wells), how)
    if level == "well":
        return wells, well_values, row_well
    treatments, well_treatment = _group_keys(wells.drop(columns=["n"]), unit_keys(wells, "treatment"), carry)
    return treatments, _reduce(well_values, well_treatment, len(treatments), how), well_treatment[row_well]


def _group_keys(df: pd.DataFrame, keys: list[str], carry) -> tuple[pd.DataFrame, np.ndarray]:
    """`_group` without values: the units' key (and carried) columns with n, and each row's unit."""
    grouped = _grouped(df, keys, carry)
    return grouped.size().rename("n").reset_index(), grouped.ngroup().to_numpy()


def _reduce(values: np.ndarray, unit_of_row: np.ndarray, n_units: int, how: str, step: int = 64) -> np.ndarray:
    """Per unit, the median (mean) over its rows of `values` in float64, by pandas' grouped reductions (the numbers
    of `aggregate_units`, NaN skipped alike), `step` columns at a time: a float64 copy of only N x step values."""
    out = np.empty((n_units, values.shape[1]), np.float64)
    for j in range(0, values.shape[1], step):
        part = pd.DataFrame(np.asarray(values[:, j : j + step], np.float64))
        out[:, j : j + step] = getattr(part.groupby(unit_of_row, sort=True), how)().to_numpy()
    return out


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
        out = aggregate_units(pred, level, probs, how, carry=[label])[0]
    out["predicted"] = [probs[i].removeprefix("prob_") for i in out[probs].to_numpy().argmax(axis=1)]
    return out
