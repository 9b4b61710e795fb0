"""Cross-validation folds, with leakage checks.

Leave-one-compound-out (LOCO): each fold holds out every image of one compound (all its
concentrations); the model never sees that compound in training.

Leave-compound-and-batch-out (LCBO): as LOCO, and every image of the test compound's batch
(BBBC021: the week) is removed from training too, so the model cannot recognise a compound by
its batch signature. A compound whose class has no training image left cannot be scored: it is
excluded and listed.

Leave-one-MoA-out (`lomo`) registers itself from cellmorph.evaluation.lomo.

Any grouping column (`evaluation.group`): "logo" (leave one group out, e.g. a patient), "group-kfold"
(k folds of whole groups), "predefined" (one fold per value of a column such as Metadata_Fold).

Single train/test splits (one Fold each), for tables without compounds or for a course's protocol:

- "random": a seeded random split holding out 1/6 of the rows: on the 20,405 CRCHistoPhenotypes
  nuclei that is Bayramoglu & Heikkilae's 17,004 / 3,401. Nuclei of one image land on both sides.
- "image-grouped": the same fraction, but whole source images (Metadata_Image) are held out, so no
  image contributes to both training and test: the leakage-free number.
- "holdout-25": the course lab's random 75/25 validation split (rows = fields of view; fields of one
  well or compound land on both sides, so it flatters compared with LOCO).

The split seed (evaluation.split_seed, default 0) is separate from the training seed, so that runs
with different training seeds share one test set. This module holds the fold builders and the registry;
`cellmorph.evaluation.protocols.make_folds` is the one entry point. A new protocol is one
`register_protocol` call (its description included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd


class LeakageError(AssertionError):
    """A test group appears in training: the evaluation would be dishonest."""


@dataclass(frozen=True)
class Fold:
    name: str  # e.g. the held-out compound
    train: np.ndarray  # row indices into the table
    test: np.ndarray


def assert_no_leak(df: pd.DataFrame, fold: Fold, group_column: str) -> None:
    train_groups = set(df[group_column].iloc[fold.train].astype(str))
    test_groups = set(df[group_column].iloc[fold.test].astype(str))
    shared = train_groups & test_groups
    if shared:
        raise LeakageError(f"fold {fold.name}: {group_column} {sorted(shared)} in both training and test")
    if len(np.intersect1d(fold.train, fold.test)):
        raise LeakageError(f"fold {fold.name}: the same image is in training and test")


def _lcbo_candidates(df: pd.DataFrame) -> list[Fold]:
    """One fold per compound: its rows held out, and every row of its batches removed from training
    (make_folds then excludes the compounds whose class has no training row left)."""
    compounds = df["Metadata_Compound"].astype(str).to_numpy()
    batches = df["Metadata_Batch"].astype(str).to_numpy()
    folds = []
    for c in sorted(set(compounds)):
        test = np.flatnonzero(compounds == c)
        held_batches = set(batches[test])
        fold = Fold(name=c, train=np.flatnonzero((compounds != c) & ~np.isin(batches, list(held_batches))), test=test)
        assert_no_leak(df, fold, "Metadata_Compound")
        assert_no_leak(df, fold, "Metadata_Batch")
        folds.append(fold)
    return folds


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


def leave_one_group_out(df: pd.DataFrame, group: str) -> list[Fold]:
    """One fold per value of `group`, in sorted order; asserts that no test group leaks."""
    values = df[group].astype(str).to_numpy()
    folds = []
    for g in sorted(set(values)):
        fold = Fold(name=g, train=np.flatnonzero(values != g), test=np.flatnonzero(values == g))
        assert_no_leak(df, fold, group)
        folds.append(fold)
    return folds


def group_kfold(df: pd.DataFrame, group: str, n_splits: int) -> list[Fold]:
    """`n_splits` folds of whole groups (scikit-learn's GroupKFold: sizes balanced, deterministic)."""
    from sklearn.model_selection import GroupKFold

    groups = df[group].astype(str).to_numpy()
    n_groups = len(set(groups))
    if n_groups < n_splits:
        from cellmorph.errors import CellmorphError

        raise CellmorphError(f"evaluation.n_splits = {n_splits} but column '{group}' has only {n_groups} groups; lower n_splits.")
    folds = []
    for k, (train, test) in enumerate(GroupKFold(n_splits=n_splits).split(np.zeros(len(df)), groups=groups)):
        fold = Fold(name=f"{group} fold {k + 1}/{n_splits}", train=np.sort(train), test=np.sort(test))
        assert_no_leak(df, fold, group)
        folds.append(fold)
    return folds


@dataclass(frozen=True)
class Protocol:
    """A way to split rows into folds, and everything the rest of cellmorph needs to know about it.

    make(df, group, ev) -> folds (make(df, group, ev, label) when `needs_label`); `default_group` is the
    grouping column it uses when evaluation.group is empty ("" when none), `needs_group` that it has no
    default; `needs_columns` further columns it reads (lcbo: Metadata_Batch); `single_split` one
    train/test split (the random-split family); `what(group, ev, folds)` the words for its folds in the
    run's description; `fixed_group` that it ignores evaluation.group (random draws, lcbo's compound +
    batch). `runner` (lomo): the protocol scores its folds itself, in memory, instead of the runner's fold
    loop (see cellmorph.evaluation.lomo); `frozen_only` that it needs mode = "frozen"."""

    make: Callable
    default_group: str = ""
    needs_group: bool = False
    single_split: bool = False
    needs_label: bool = False
    needs_columns: tuple[str, ...] = ()
    what: Callable | None = None
    fold_word: str = "folds"
    runner: Callable | None = None
    frozen_only: str = ""  # why, when the protocol needs mode = "frozen" ("" when it does not)
    # The protocol's grouping is its own (its default_group, or none: rows drawn at random) and it never reads
    # evaluation.group: a group set there anyway is an error (protocols.check_group), never silently ignored.
    fixed_group: bool = False


def _frac(ev, default: float) -> float:
    return ev.test_fraction or default


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, protocol: Protocol) -> None:
    """Make `evaluation.protocol = name` available: the config, the folds, the description and the runner
    all read it from here (cellmorph.evaluation.protocols imports every built-in registration)."""
    PROTOCOLS[name] = protocol


register_protocol("loco", Protocol(lambda df, g, ev: leave_one_group_out(df, g), default_group="Metadata_Compound",
                                   what=lambda g, ev, folds: "leave-one-compound-out"))
register_protocol("lcbo", Protocol(lambda df, g, ev: _lcbo_candidates(df), default_group="Metadata_Compound", needs_columns=("Metadata_Batch",), fixed_group=True,
                                   what=lambda g, ev, folds: "leave-compound-and-batch-out (the test compound and every row of its batch held out of training)"))
register_protocol("logo", Protocol(lambda df, g, ev: leave_one_group_out(df, g), needs_group=True,
                                   what=lambda g, ev, folds: f"leave-one-group-out over {g}"))
register_protocol("group-kfold", Protocol(lambda df, g, ev: group_kfold(df, g, ev.n_splits), needs_group=True,
                                          what=lambda g, ev, folds: f"{ev.n_splits}-fold over whole {g} groups"))
register_protocol("predefined", Protocol(lambda df, g, ev: leave_one_group_out(df, g), default_group="Metadata_Fold",
                                         what=lambda g, ev, folds: f"predefined folds from {g}"))
register_protocol("random", Protocol(lambda df, g, ev: random_split(df, _frac(ev, PAPER_TEST_FRACTION), ev.split_seed), single_split=True, fixed_group=True))
register_protocol("image-grouped", Protocol(lambda df, g, ev: group_split(df, g, _frac(ev, PAPER_TEST_FRACTION), ev.split_seed, name="image-grouped"),
                                            default_group="Metadata_Image", single_split=True))
register_protocol("holdout-25", Protocol(lambda df, g, ev: random_split(df, _frac(ev, 0.25), ev.split_seed, name="holdout-25"), single_split=True,
                                         fixed_group=True))
