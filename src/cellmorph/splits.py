"""Cross-validation folds, with leakage checks.

Leave-one-compound-out (LOCO): each fold holds out every image of one compound (all its
concentrations); the model never sees that compound in training.

Leave-compound-and-batch-out (LCBO): as LOCO, and every image of the test compound's batch
(BBBC021: the week) is removed from training too, so the model cannot recognise a compound by
its batch signature. A compound whose class has no training image left cannot be scored: it is
excluded and listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


class LeakageError(AssertionError):
    """A test group appears in training: the evaluation would be dishonest."""


@dataclass(frozen=True)
class Fold:
    name: str  # e.g. the held-out compound
    train: np.ndarray  # row indices into the table
    test: np.ndarray


def leave_one_compound_out(df: pd.DataFrame, label: str = "Metadata_MoA") -> list[Fold]:
    """One fold per compound, in sorted compound order; asserts that no test compound leaks."""
    compounds = df["Metadata_Compound"].astype(str).to_numpy()
    folds = []
    for c in sorted(set(compounds)):
        test = np.flatnonzero(compounds == c)
        train = np.flatnonzero(compounds != c)
        fold = Fold(name=c, train=train, test=test)
        assert_no_leak(df, fold, "Metadata_Compound")
        folds.append(fold)
    return folds


def assert_no_leak(df: pd.DataFrame, fold: Fold, group_column: str) -> None:
    train_groups = set(df[group_column].iloc[fold.train].astype(str))
    test_groups = set(df[group_column].iloc[fold.test].astype(str))
    shared = train_groups & test_groups
    if shared:
        raise LeakageError(f"fold {fold.name}: {group_column} {sorted(shared)} in both training and test")
    if len(np.intersect1d(fold.train, fold.test)):
        raise LeakageError(f"fold {fold.name}: the same image is in training and test")


def leave_compound_and_batch_out(df: pd.DataFrame, label: str = "Metadata_MoA") -> list[Fold]:
    """One fold per scorable compound; see `lcbo_excluded` for those left out."""
    folds = []
    for fold in _lcbo_candidates(df):
        if _lcbo_reason(df, fold, label) is None:
            assert_no_leak(df, fold, "Metadata_Compound")
            assert_no_leak(df, fold, "Metadata_Batch")
            folds.append(fold)
    return folds


def lcbo_excluded(df: pd.DataFrame, label: str = "Metadata_MoA") -> list[dict]:
    """The compounds LCBO cannot score, with their class, batch and the reason."""
    out = []
    for fold in _lcbo_candidates(df):
        reason = _lcbo_reason(df, fold, label)
        if reason is not None:
            rows = df.iloc[fold.test]
            out.append({"compound": fold.name, label: sorted(rows[label].astype(str).unique()), "batch": sorted(rows["Metadata_Batch"].astype(str).unique()), "reason": reason})
    return out


def _lcbo_candidates(df: pd.DataFrame) -> list[Fold]:
    if "Metadata_Batch" not in df.columns:
        from cellmorph.errors import CellmorphError

        raise CellmorphError("protocol 'lcbo' needs a Metadata_Batch column (e.g. the week of each plate) in the dataset.")
    compounds = df["Metadata_Compound"].astype(str).to_numpy()
    batches = df["Metadata_Batch"].astype(str).to_numpy()
    folds = []
    for c in sorted(set(compounds)):
        test = np.flatnonzero(compounds == c)
        held_batches = set(batches[test])
        train = np.flatnonzero((compounds != c) & ~np.isin(batches, list(held_batches)))
        folds.append(Fold(name=c, train=train, test=test))
    return folds


def _lcbo_reason(df: pd.DataFrame, fold: Fold, label: str) -> str | None:
    missing = set(df[label].iloc[fold.test].astype(str)) - set(df[label].iloc[fold.train].astype(str))
    if missing:
        return f"no training image of {sorted(missing)} outside the compound's batch"
    return None


PROTOCOLS = {"loco": leave_one_compound_out, "lcbo": leave_compound_and_batch_out}
PROTOCOL_DESCRIPTIONS = {
    "loco": "leave-one-compound-out: each fold holds out every image of one compound",
    "lcbo": "leave-compound-and-batch-out: each fold holds out one compound and every image of its batch (week)",
}
