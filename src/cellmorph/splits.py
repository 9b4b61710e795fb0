"""Cross-validation folds, with leakage checks.

Leave-one-compound-out (LOCO): each fold holds out every image of one compound (all its
concentrations); the model never sees that compound in training.

Leave-compound-and-batch-out (LCBO): as LOCO, and every image of the test compound's batch
(BBBC021: the week) is removed from training too, so the model cannot recognise a compound by
its batch signature. A compound whose class has no training image left cannot be scored: it is
excluded and listed.

Single train/test splits (one Fold each), for tables without compounds or for a course's protocol:

- "random": a seeded random split holding out 1/6 of the rows: on the 20,405 CRCHistoPhenotypes
  nuclei that is Bayramoglu & Heikkilae's 17,004 / 3,401. Nuclei of one image land on both sides.
- "image-grouped": the same fraction, but whole source images (Metadata_Image) are held out, so no
  image contributes to both training and test: the leakage-free number.
- "holdout-25": the course lab's random 75/25 validation split (rows = fields of view; fields of one
  well or compound land on both sides, so it flatters compared with LOCO).

The split seed is fixed (SPLIT_SEED) so that runs with different training seeds share one test set.
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



SPLIT_SEED = 0
PAPER_TEST_FRACTION = 3401 / 20405  # Bayramoglu & Heikkilae 2016: 17,004 train / 3,401 test nuclei


def random_split(df: pd.DataFrame, test_fraction: float = PAPER_TEST_FRACTION, seed: int = SPLIT_SEED, name: str = "random") -> list[Fold]:
    """One fold: round(n * test_fraction) rows drawn at random (seeded) for test, the rest for training."""
    n = len(df)
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(f"test fraction {test_fraction} leaves no training or no test rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    fold = Fold(name=name, train=np.sort(perm[n_test:]), test=np.sort(perm[:n_test]))
    if len(np.intersect1d(fold.train, fold.test)):
        raise LeakageError(f"fold {name}: the same row is in training and test")
    return [fold]


def group_split(df: pd.DataFrame, group_column: str, test_fraction: float = PAPER_TEST_FRACTION, seed: int = SPLIT_SEED, name: str | None = None) -> list[Fold]:
    """One fold holding out whole groups (seeded order) until about `test_fraction` of the rows are held out."""
    groups = df[group_column].astype(str).to_numpy()
    names, counts = np.unique(groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    target = len(df) * test_fraction
    chosen, total = [], 0
    for i in order:
        # take the next group while that brings the held-out count closer to the target
        if abs(total + counts[i] - target) <= abs(total - target) or not chosen:
            chosen.append(names[i])
            total += counts[i]
    is_test = np.isin(groups, chosen)
    if is_test.all():
        raise ValueError(f"only one {group_column} group: nothing left to train on")
    fold = Fold(name=name or f"{group_column}-grouped", train=np.flatnonzero(~is_test), test=np.flatnonzero(is_test))
    assert_no_leak(df, fold, group_column)
    return [fold]


def image_grouped_split(df: pd.DataFrame, label: str = "Metadata_Label") -> list[Fold]:
    return group_split(df, "Metadata_Image", name="image-grouped")


def holdout_25(df: pd.DataFrame, label: str = "Metadata_MoA") -> list[Fold]:
    return random_split(df, test_fraction=0.25, name="holdout-25")


def _random_paper(df: pd.DataFrame, label: str = "Metadata_Label") -> list[Fold]:
    return random_split(df)


# Every protocol is called as fn(table_df, label_column) -> list[Fold].
PROTOCOLS = {
    "loco": leave_one_compound_out,
    "lcbo": leave_compound_and_batch_out,
    "random": _random_paper,
    "image-grouped": image_grouped_split,
    "holdout-25": holdout_25,
}

PROTOCOL_DESCRIPTIONS = {
    "loco": "leave-one-compound-out: each fold holds out every image of one compound",
    "lcbo": "leave-compound-and-batch-out: each fold holds out one compound and every image of its batch (week)",
    "random": f"random split (seed {SPLIT_SEED}) holding out 1/6 of the rows (17,004 / 3,401 on the 20,405 nuclei, as Bayramoglu & Heikkilae 2016)",
    "image-grouped": f"split by source image (seed {SPLIT_SEED}): whole images held out, about 1/6 of the rows; no image on both sides",
    "holdout-25": f"random 75/25 split of the rows (seed {SPLIT_SEED}), the course lab's validation split",
}
