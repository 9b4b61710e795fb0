"""The protocol catalogue: every built-in protocol registered (splits.py's, and lomo.py's, which registers
itself), and the one entry point that turns a table into folds.

Example:
    >>> from cellmorph.evaluation.protocols import make_folds
    >>> folds, excluded, text = make_folds(table.df, "Metadata_MoA", cfg.evaluation)
    >>> text
    'leave-one-compound-out: 18 folds over 660 rows'
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd

from cellmorph.data.table import labelled_mask
from cellmorph.errors import CellmorphError
from cellmorph.evaluation import lomo  # noqa: F401  (registers the lomo protocol)
from cellmorph.evaluation.splits import PROTOCOLS, Fold, Protocol


def names() -> list[str]:
    """The registered protocol names (what evaluation.protocol accepts)."""
    return sorted(PROTOCOLS)


def get(name: str) -> Protocol:
    """The protocol registered as `name`, or an error naming the config field and the choices."""
    if name not in PROTOCOLS:
        raise CellmorphError(f"evaluation.protocol = '{name}': unknown; choose from {names()}.")
    return PROTOCOLS[name]


def protocol_group(ev) -> str:
    """The grouping column a protocol uses under these evaluation settings ("" when it uses none)."""
    return ev.group or get(ev.protocol).default_group


GROUPED_CHOICES = "image-grouped (one split of whole groups), logo or group-kfold"


def check_group(ev) -> None:
    """Refuse an evaluation.group that the protocol would ignore (random draws, lcbo's compound + batch): the run
    would be described and read as grouped while test groups also sit in training. Cheap (no data): the runner
    calls it before the dataset is loaded."""
    p = get(ev.protocol)
    if not p.fixed_group or not ev.group or ev.group == p.default_group:
        return
    how = (f"always holds out {p.default_group} (with its {', '.join(c.removeprefix('Metadata_') for c in p.needs_columns)})"
           if p.default_group else "draws rows at random")
    raise CellmorphError(
        f"evaluation.group = '{ev.group}' is set, but evaluation.protocol = '{ev.protocol}' {how} and ignores it: "
        f"rows of one {ev.group} would land in both training and test. To hold whole {ev.group} groups out, choose "
        f"evaluation.protocol = {GROUPED_CHOICES} (e.g. --set evaluation.protocol=logo); to split as '{ev.protocol}' does, "
        "remove evaluation.group from the config (or --set evaluation.group=\"\")."
    )


def make_folds(df: pd.DataFrame, label: str, ev) -> tuple[list[Fold], list[dict], str]:
    """Folds of `df` under the evaluation settings `ev`, the groups that cannot be scored, and a
    description computed from the data.

    Rows without a label (empty or NaN) never train; they are predicted in their test fold. A fold
    whose test rows hold a class with no training row left is excluded and listed (a compound alone
    in its class under LOCO, or a whole week under LCBO), never scored silently.

    Example:
        >>> folds, excluded, text = make_folds(table.df, "Metadata_MoA", cfg.evaluation)
    """
    p = get(ev.protocol)
    check_group(ev)
    group = protocol_group(ev)
    if p.needs_group and not group:
        raise CellmorphError(f"evaluation.protocol = '{ev.protocol}' needs evaluation.group, the column to group by (e.g. Metadata_Patient).")
    needed = ([group] if group else []) + list(p.needs_columns)
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
    by_batch = "Metadata_Batch" in p.needs_columns  # lcbo: a compound is excluded with its batch
    y = df[label].astype(str).to_numpy()
    for fold in candidates:
        train = fold.train[labelled[fold.train]]
        fold = replace(fold, train=train)  # keeps a subclass's fields (lomo's NovelFold)
        # a lomo fold's novel MoA is missing from training on purpose
        missing_classes = sorted(set(y[fold.test][labelled[fold.test]]) - set(y[train]) - {getattr(fold, "novel", None)})
        if missing_classes:
            rows = df.iloc[fold.test]
            reason = f"no training row of class {missing_classes} left" + (" outside the compound's batch" if by_batch else "")
            excluded.append({"group": fold.name, "column": group or None, "classes": missing_classes, "rows": int(len(rows)),
                             **({"batch": sorted(rows["Metadata_Batch"].astype(str).unique())} if by_batch else {}), "reason": reason})
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
    inner = SimpleNamespace(**{**ev.model_dump(), "split_seed": ev.split_seed + 1})
    out = []
    for fold in folds:
        (v,) = p.make(df.iloc[fold.train].reset_index(drop=True), group, inner)
        out.append(Fold(f"{fold.name} validation", fold.train[v.train], fold.train[v.test]))
    return out


def describe(df: pd.DataFrame, folds: list[Fold], excluded: list[dict], group: str, ev) -> str:
    """What the protocol did to these rows, in words, with the counts: computed from the folds as made (how many
    groups were held out, and how many of them also sit in training), never from the settings alone."""
    n = len(df)
    p = get(ev.protocol)
    codes = pd.factorize(df[group].astype(str))[0] if group and group in df.columns else None
    if p.single_split:
        (f,) = folds
        if codes is None:
            how = "rows drawn at random"
        else:
            held, shared = _groups(codes, f)
            how = (f"whole {group} groups held out ({held:,} in test, none of them in training)" if not shared else
                   f"rows drawn without regard to {group}: {shared:,} of the {held:,} {group} groups in test are also in training")
        text = f"{ev.protocol}: one split (seed {ev.split_seed}), {how}: {len(f.train):,} training / {len(f.test):,} test rows of {n:,}"
        if ev.validation:
            text += f" (validation: both drawn from the training rows of that split, split seed {ev.split_seed + 1}; its test rows unused)"
    else:
        text = f"{p.what(group, ev, folds)}: {len(folds)} {p.fold_word} over {n:,} rows"
        leaky = [f.name for f in folds if codes is not None and p.runner is None and _groups(codes, f)[1]]
        if leaky:
            text += f"; {len(leaky)} fold(s) with {group} groups in both training and test ({', '.join(map(str, leaky[:3]))})"
    if excluded:
        text += f"; {len(excluded)} held-out group(s) excluded (a class with no training data), listed in metrics.json"
    return text


def _groups(codes, fold: Fold) -> tuple[int, int]:
    """(groups among the fold's test rows, how many of them also have training rows)."""
    test, train = np.unique(codes[fold.test]), np.unique(codes[fold.train])
    return len(test), len(np.intersect1d(test, train, assume_unique=True))
