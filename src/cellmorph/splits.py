"""Cross-validation folds, with leakage checks.

Leave-one-compound-out (LOCO): each fold holds out every image of one compound (all its
concentrations); the model never sees that compound in training.
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


def leave_one_compound_out(df: pd.DataFrame) -> list[Fold]:
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


PROTOCOLS = {"loco": leave_one_compound_out}
