"""Cross-validation folds, with leakage checks.

Leave-one-compound-out (LOCO): each fold holds out every image of one compound (all its
concentrations); the model never sees that compound in training.

Leave-compound-and-batch-out (LCBO): as LOCO, and every image of the test compound's batch
(BBBC021: the week) is removed from training too, so the model cannot recognise a compound by
its batch signature. A compound whose class has no training image left cannot be scored: it is
excluded and listed.

Leave-one-MoA-out (`lomo`, cellmorph.evaluation.novelty): for each MoA, no model sees it; its images are
scored as novel units, while the other MoAs' compounds are held out one at a time (with nested
calibration), to measure whether the novel MoA comes out as "none of the known MoAs".

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
with different training seeds share one test set. `make_folds` is the one entry point: it applies the
protocol, keeps unlabelled rows out of training, excludes and lists folds that cannot be scored, and
describes what it did from the data at hand. A new protocol is one `register_protocol` call (and its
name in config.EvaluationConfig.protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    """A way to split rows into folds. `make(df, group, ev)` -> folds; `group` is the grouping column
    it needs ("" when none); `describe(df, folds, group, ev)` says what was done, from the data at hand."""

    make: Callable
    default_group: str = ""
    needs_group: bool = False
    single_split: bool = False
    # make(df, group, ev, label) instead: the protocol splits by the label itself (lomo)
    needs_label: bool = False


def _frac(ev, default: float) -> float:
    return ev.test_fraction or default


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, protocol: Protocol) -> None:
    """Make `evaluation.protocol = name` available (config.py lists the names it accepts)."""
    PROTOCOLS[name] = protocol


register_protocol("loco", Protocol(lambda df, g, ev: leave_one_group_out(df, g), default_group="Metadata_Compound"))
register_protocol("lcbo", Protocol(lambda df, g, ev: _lcbo_candidates(df), default_group="Metadata_Compound"))
register_protocol("logo", Protocol(lambda df, g, ev: leave_one_group_out(df, g), needs_group=True))
register_protocol("group-kfold", Protocol(lambda df, g, ev: group_kfold(df, g, ev.n_splits), needs_group=True))
register_protocol("predefined", Protocol(lambda df, g, ev: leave_one_group_out(df, g), default_group="Metadata_Fold"))
register_protocol("lomo", Protocol(lambda df, g, ev, label: _lomo(df, label, g), default_group="Metadata_Compound", needs_label=True))
register_protocol("random", Protocol(lambda df, g, ev: random_split(df, _frac(ev, PAPER_TEST_FRACTION), ev.split_seed), single_split=True))
register_protocol("image-grouped", Protocol(lambda df, g, ev: group_split(df, g, _frac(ev, PAPER_TEST_FRACTION), ev.split_seed, name="image-grouped"),
                                            default_group="Metadata_Image", single_split=True))
register_protocol("holdout-25", Protocol(lambda df, g, ev: random_split(df, _frac(ev, 0.25), ev.split_seed, name="holdout-25"), single_split=True))


def _lomo(df: pd.DataFrame, label: str, group: str) -> list[Fold]:
    """Leave-one-MoA-out with nested leave-one-compound-out: cellmorph.evaluation.novelty.lomo_folds."""
    from cellmorph.evaluation.novelty import lomo_folds

    return lomo_folds(df, label, group)


def protocol_group(ev) -> str:
    """The grouping column a protocol uses under these evaluation settings ("" when it uses none)."""
    p = PROTOCOLS[ev.protocol]
    return ev.group or p.default_group


def make_folds(df: pd.DataFrame, label: str, ev) -> tuple[list[Fold], list[dict], str]:
    """Folds of `df` under the evaluation settings `ev`, the groups that cannot be scored, and a
    description computed from the data.

    Rows without a label (empty or NaN) never train; they are predicted in their test fold. A fold
    whose test rows hold a class with no training row left is excluded and listed (a compound alone
    in its class under LOCO, or a whole week under LCBO), never scored silently.

    Example:
        >>> folds, excluded, text = make_folds(table.df, "Metadata_MoA", cfg.evaluation)
    """
    from cellmorph.errors import CellmorphError

    if ev.protocol not in PROTOCOLS:
        raise CellmorphError(f"evaluation.protocol = '{ev.protocol}': unknown; choose from {sorted(PROTOCOLS)}.")
    p = PROTOCOLS[ev.protocol]
    group = protocol_group(ev)
    if p.needs_group and not group:
        raise CellmorphError(f"evaluation.protocol = '{ev.protocol}' needs evaluation.group, the column to group by (e.g. Metadata_Patient).")
    needed = [group] if group else []
    if ev.protocol == "lcbo":
        needed.append("Metadata_Batch")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise CellmorphError(
            f"evaluation.protocol = '{ev.protocol}' groups by {missing}, which the dataset lacks (columns: "
            f"{[c for c in df.columns if c.startswith('Metadata_')]}). Set evaluation.group to one of them, or choose another protocol."
        )
    labelled = labelled_mask(df, label)
    if ev.validation and not p.single_split:
        raise CellmorphError(f"evaluation.validation = true works with the single-split protocols (random, image-grouped, holdout-25), not '{ev.protocol}'.")
    try:
        candidates = p.make(df, group, ev, label) if p.needs_label else p.make(df, group, ev)
        if ev.validation:
            candidates = validation_folds(p, df, group, ev, candidates)
    except ValueError as err:
        raise CellmorphError(f"evaluation.protocol = '{ev.protocol}': {err}.") from None
    folds, excluded = [], []
    y = df[label].astype(str).to_numpy()
    for fold in candidates:
        train = fold.train[labelled[fold.train]]
        fold = replace(fold, train=train)  # keeps a subclass's fields (lomo's NovelFold)
        # a lomo fold's novel MoA is missing from training on purpose
        missing_classes = sorted(set(y[fold.test][labelled[fold.test]]) - set(y[train]) - {getattr(fold, "novel", None)})
        if missing_classes:
            rows = df.iloc[fold.test]
            reason = f"no training row of class {missing_classes} left" + (" outside the compound's batch" if ev.protocol == "lcbo" else "")
            excluded.append({"group": fold.name, "column": group or None, "classes": missing_classes, "rows": int(len(rows)),
                             **({"batch": sorted(rows["Metadata_Batch"].astype(str).unique())} if ev.protocol == "lcbo" else {}), "reason": reason})
            continue
        folds.append(fold)
    if not folds:
        raise CellmorphError(
            f"evaluation.protocol = '{ev.protocol}' leaves no fold that can be scored: every held-out {group or 'split'} "
            f"holds a class with no training data ({len(excluded)} excluded). Add data, or choose another protocol."
        )
    return folds, excluded, describe(df, folds, excluded, group, ev)


def validation_folds(p: Protocol, df: pd.DataFrame, group: str, ev, folds: list[Fold]) -> list[Fold]:
    """Each fold's training rows split again by the protocol's own rule (split seed + 1): the new fold
    trains on part of them and scores the rest. The original test rows are in neither, so a recipe
    chosen on these scores has never looked at the test set."""
    from types import SimpleNamespace

    inner = SimpleNamespace(**{**ev.model_dump(), "split_seed": ev.split_seed + 1})
    out = []
    for fold in folds:
        (v,) = p.make(df.iloc[fold.train].reset_index(drop=True), group, inner)
        out.append(Fold(f"{fold.name} validation", fold.train[v.train], fold.train[v.test]))
    return out


def labelled_mask(df: pd.DataFrame, label: str) -> np.ndarray:
    """Rows with a label (empty strings and NaN are unlabelled: predicted, never trained on or scored)."""
    col = df[label]
    return (col.notna() & (col.astype(str).str.strip() != "")).to_numpy()


def describe(df: pd.DataFrame, folds: list[Fold], excluded: list[dict], group: str, ev) -> str:
    """What the protocol did to these rows, in words, with the counts."""
    n = len(df)
    if PROTOCOLS[ev.protocol].single_split:
        (f,) = folds
        how = f"whole {group} groups held out" if group else "rows drawn at random"
        text = f"{ev.protocol}: one split (seed {ev.split_seed}), {how}: {len(f.train):,} training / {len(f.test):,} test rows of {n:,}"
        if ev.validation:
            text += f" (validation: both drawn from the training rows of that split, split seed {ev.split_seed + 1}; its test rows unused)"
    else:
        if ev.protocol == "lomo":
            moas = sorted({f.novel for f in folds})
            return (f"leave-one-MoA-out: {len(moas)} rounds, each MoA unseen by every model of its round (its images scored as novel), "
                    f"and in each round leave-one-compound-out over the known MoAs' compounds ({sum(1 for f in folds if f.held_out)} folds), "
                    f"calibrated on nested out-of-fold predictions: {len(folds)} outer folds over {n:,} rows")
        what = {"loco": "leave-one-compound-out", "lcbo": "leave-compound-and-batch-out (the test compound and every row of its batch held out of training)",
                "logo": f"leave-one-group-out over {group}", "predefined": f"predefined folds from {group}", "group-kfold": f"{ev.n_splits}-fold over whole {group} groups"}[ev.protocol]
        text = f"{what}: {len(folds)} folds over {n:,} rows"
    if excluded:
        text += f"; {len(excluded)} held-out group(s) excluded (a class with no training data), listed in metrics.json"
    return text
