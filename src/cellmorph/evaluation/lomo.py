"""The `lomo` protocol (leave-one-MoA-out): registered with the other protocols, it runs its own rounds of
heads in memory and reports novelty metrics (the scores themselves are in cellmorph.evaluation.novelty).

Most compounds of a real screen act by a mechanism outside the training classes. A classifier
always names one of its classes; the conformal prediction set (cellmorph.evaluation.conformal) can instead
come out empty: "none of the known MoAs". `lomo` measures how well that works, with no model ever
seeing the novel MoA or the compound it is tested on, calibration scores included:

For each MoA m (the "novel" one; every image of it is out of every model of its round):

- known held-out compounds: for each compound c of the other MoAs, a head trained on the known
  MoAs without c predicts c (as leave-one-compound-out would). Its calibration set is NESTED: the
  out-of-fold predictions of the other known compounds d, each from a head trained without m, c
  and d (one head per pair {c, d}; it predicts both). The held-out unit is flagged when its
  prediction set at 0.9 is empty: a false flag, since its MoA is known.
- novel units: a head trained on all known compounds predicts m's images; its calibration set
  is the leave-one-compound-out predictions of the known compounds above (none saw m).

Reported per novel MoA and overall (treatments; images and wells too when scored): the fraction
of novel units flagged at 0.9, the false-flag rate on known held-out units, and the AUROC of the
novelty score (1 - the largest conformal p-value) between novel and known held-out units
(scikit-learn's roc_auc_score). A round per MoA with K known compounds fits 1 + K + K(K-1)/2
logistic heads (about 730 on the BBBC021 6-MoA subset): cheap on cached frozen features, hundreds
of fine-tunes otherwise, so `lomo` requires mode = "frozen".

Example:
    >>> from cellmorph.config import load_config
    >>> from cellmorph.engine.runner import run_experiment
    >>> m = run_experiment(load_config("configs/lomo.toml"), "runs/lomo")
    >>> round(m.novelty["overall"]["treatment"]["auroc"], 3)  # frozen EfficientNet-Lite0, seed 0
    0.703
    >>> cfg = load_config("configs/lomo.toml", ["evaluation.novelty_score=distance"])
    >>> round(run_experiment(cfg, "runs/lomo-distance").novelty["overall"]["treatment"]["auroc"], 3)
    0.858
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellmorph.data.table import labelled_mask, labelled_rows
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.aggregate import aggregate
from cellmorph.evaluation.conformal import Calibrator, in_set, level_table
from cellmorph.evaluation.metrics import Metrics, misclassified, score_level
from cellmorph.evaluation.novelty import (FLAG_CONFIDENCE, FLAG_TEXT, NOVELTY_SCORES, SCORE_TEXT, UnitProfiles, distance_p_values, nearest_distance, unit_profiles)
from cellmorph.evaluation.splits import Fold, LeakageError, Protocol, assert_no_leak, register_protocol
from cellmorph.models.features import logistic_head


@dataclass(frozen=True)
class NovelFold(Fold):
    """An outer fold of `lomo`: `novel` is the MoA no model of its round sees; `held_out` the known
    compound held out ("" for the fold whose test rows are the novel MoA's)."""

    novel: str = ""
    held_out: str = ""


def lomo_folds(df: pd.DataFrame, label: str, group: str = "Metadata_Compound") -> list[NovelFold]:
    """The outer folds: per MoA m (sorted), one fold testing m's rows (trained on every labelled row
    of the other MoAs), then one per known compound c (trained on those rows without c, testing c).

    Raises LeakageError when a fold's training rows hold the novel MoA or the held-out compound
    (e.g. a compound annotated with two MoAs).

    >>> folds = lomo_folds(table.df, "Metadata_MoA")
    >>> folds[0].name, folds[1].name
    ('novel Aurora kinase inhibitors', 'Aurora kinase inhibitors unseen | held out AZ-C')"""
    lab = labelled_mask(df, label)
    y = np.where(lab, df[label].astype(str).to_numpy(), "")
    compounds = df[group].astype(str).to_numpy()
    classes = sorted(set(y[lab]))
    if len(classes) < 3:
        raise CellmorphError(f"evaluation.protocol = 'lomo' needs at least 3 classes in {label} (2 stay known when one is novel); found {classes}.")
    folds = []
    for m in classes:
        known = lab & (y != m)
        folds.append(NovelFold(f"novel {m}", np.flatnonzero(known), np.flatnonzero(y == m), novel=m))
        for c in sorted(set(compounds[known])):
            folds.append(NovelFold(f"{m} unseen | held out {c}", np.flatnonzero(known & (compounds != c)), np.flatnonzero(known & (compounds == c)),
                                   novel=m, held_out=c))
    for f in folds:
        check_fold(df, label, group, f)
    return folds


def check_fold(df: pd.DataFrame, label: str, group: str, fold: NovelFold) -> None:
    """Leakage checks of one lomo fold: no training row of the novel MoA, none of a test compound."""
    train_labels = set(df[label].iloc[fold.train].astype(str))
    if fold.novel in train_labels:
        raise LeakageError(f"fold {fold.name}: the novel MoA {fold.novel!r} is in training")
    assert_no_leak(df, fold, group)


def nested_folds(novel_fold: NovelFold, known_folds: list[NovelFold], compounds: np.ndarray) -> list[NovelFold]:
    """The nested calibration folds of one round: for each pair {c, d} of known compounds, training =
    the round's known rows without c and d, test = the rows of c, then d. Its predictions of c
    calibrate the held-out fold of d, and those of d the held-out fold of c.

    >>> pairs = nested_folds(folds[0], folds[1:16], table.df["Metadata_Compound"].to_numpy())"""
    rows_of = {f.held_out: f.test for f in known_folds}
    names = list(rows_of)
    train_known = novel_fold.train
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            c, d = names[a], names[b]
            train = train_known[(compounds[train_known] != c) & (compounds[train_known] != d)]
            out.append(NovelFold(f"{novel_fold.novel} unseen | {c} & {d} out", train, np.concatenate([rows_of[c], rows_of[d]]),
                                 novel=novel_fold.novel, held_out=f"{c}|{d}"))
    return out


def _head(features, y, train, test, n_classes, C, cw, seed):
    return logistic_head(features, y, train, test, n_classes, C, cw, seed)


def run_lomo(features: np.ndarray, y: np.ndarray, df: pd.DataFrame, folds: list[NovelFold], classes: list[str], label: str,
             levels: list[str], how: str, C: float, class_weight: str | None, seed: int, group: str = "Metadata_Compound",
             progress=None, novelty_score: str = "softmax") -> tuple[pd.DataFrame, dict, dict[str, pd.DataFrame]]:
    """Fit every head of `lomo` on frozen `features` and score novelty (`novelty_score`: "softmax",
    "distance" or "combined", see the module docstring).

    Returns the outer folds' image predictions (Metadata_*, fold, fold_held_out, novel_moa, role =
    "novel" | "known held-out", prob_<class>), the novelty block of metrics.json, and per level the
    scored units (novel MoA, role, keys, label, prob_<class>, novelty, flagged, in-set at 0.9; with
    the distance score also nn_distance, p_distance and both scores' novelty and flag)."""
    if novelty_score not in NOVELTY_SCORES:
        raise CellmorphError(f"novelty score {novelty_score!r} is not known: use one of {', '.join(NOVELTY_SCORES)}.")
    use_distance = novelty_score != "softmax"
    profiles = {lv: unit_profiles(features, df, lv, label, how) for lv in levels} if use_distance else {}
    compounds = df[group].astype(str).to_numpy()
    meta = [c for c in df.columns if c.startswith("Metadata_")]
    K = len(classes)
    cw = None if class_weight == "none" else "balanced"

    def frame(rows, probs, i, fold, role):
        p = df.iloc[rows][meta].copy().reset_index(drop=True)
        p.insert(0, "fold", i)
        p.insert(1, "fold_held_out", fold.name)
        p["novel_moa"], p["role"] = fold.novel, role
        for j, c in enumerate(classes):
            p[f"prob_{c}"] = probs[:, j]
        return p

    by_moa: dict[str, list[tuple[int, NovelFold]]] = {}
    for i, f in enumerate(folds):
        by_moa.setdefault(f.novel, []).append((i, f))
    task = progress.add_task("lomo heads", total=sum(_n_heads(fs) for fs in by_moa.values())) if progress else None
    advance = (lambda: progress.advance(task)) if progress else (lambda: None)

    outer, units_out, rounds = [], {lv: [] for lv in levels}, {}
    for m, fs in by_moa.items():
        novel = [(i, f) for i, f in fs if not f.held_out]
        known = [(i, f) for i, f in fs if f.held_out]
        if len(novel) != 1 or len(known) < 2:
            continue  # an incomplete round (e.g. evaluation.max_folds cut it): not scored
        known_classes = [c for c in classes if c != m]
        keep = [classes.index(c) for c in known_classes]
        # leave-one-compound-out over the known compounds: the known held-out predictions
        loco = {}
        for i, f in known:
            loco[f.held_out] = frame(f.test, _head(features, y, f.train, f.test, K, C, cw, seed), i, f, "known held-out")
            advance()
        i_nov, f_nov = novel[0]
        novel_pred = frame(f_nov.test, _head(features, y, f_nov.train, f_nov.test, K, C, cw, seed), i_nov, f_nov, "novel")
        advance()
        # nested: one head per pair {c, d} of known compounds, trained without m, c and d
        names = [f.held_out for _, f in known]
        rows_of = {f.held_out: f.test for _, f in known}
        nested: dict[str, list[pd.DataFrame]] = {c: [] for c in names}
        for pair in nested_folds(f_nov, [f for _, f in known], compounds):
            c, d = pair.held_out.split("|")
            probs = _head(features, y, pair.train, pair.test, K, C, cw, seed)
            nc = len(rows_of[c])
            nested[d].append(frame(rows_of[c], probs[:nc], -1, f_nov, "calibration"))  # c's score, for calibrating d's test
            nested[c].append(frame(rows_of[d], probs[nc:], -1, f_nov, "calibration"))  # d's score, for calibrating c's test
            advance()
        outer += [novel_pred, *loco.values()]
        rounds[m] = {"known_compounds": len(names), "novel_rows": int(len(f_nov.test)), "heads": _n_heads(fs)}
        for lv in levels:
            cal_all = level_table(pd.concat(loco.values(), ignore_index=True), label, lv, how)
            tables = [_score_units(Calibrator, level_table(novel_pred, label, lv, how), cal_all, known_classes, keep, label, group)]
            for c in names:
                cal = level_table(pd.concat(nested[c], ignore_index=True), label, lv, how)
                tables.append(_score_units(Calibrator, level_table(loco[c], label, lv, how), cal, known_classes, keep, label, group))
            t = pd.concat(tables, ignore_index=True).drop(columns=["novel_moa", "role", "fold", "fold_held_out"], errors="ignore")
            t.insert(0, "novel_moa", m)
            t.insert(1, "role", np.where(t[label].astype(str) == m, "novel", "known held-out"))
            if use_distance:
                t = _score_distance(t, _round_distances(features, profiles[lv], f_nov, [f for _, f in known], compounds), novelty_score)
            units_out[lv].append(t)
    if not rounds:
        raise CellmorphError("lomo scored no round: every novel MoA needs its novel fold and at least 2 known held-out compounds "
                             "(is evaluation.max_folds cutting the folds?).")
    units = {lv: pd.concat(ts, ignore_index=True) for lv, ts in units_out.items() if ts}
    block = summarize(units, label, rounds, novelty_score)
    return pd.concat(outer, ignore_index=True), block, units


def _round_distances(features: np.ndarray, prof: UnitProfiles, novel_fold: NovelFold, known_folds: list[NovelFold],
                     compounds: np.ndarray) -> pd.DataFrame:
    """Distance p-values of one round's units at one level: the novel MoA's units against the known
    compounds' leave-one-compound-out distances; each known held-out compound c's units against the
    other known compounds' distances from the pair folds {c, d} (reference without m, c and d).
    Returns the scored units: unit (index into prof), nn_distance, p_distance."""
    loco = {f.held_out: nearest_distance(features, prof, f.train, f.test) for f in known_folds}
    nested: dict[str, list[np.ndarray]] = {c: [] for c in loco}
    rows_of = {f.held_out: f.test for f in known_folds}
    for pair in nested_folds(novel_fold, known_folds, compounds):
        c, d = pair.held_out.split("|")
        nested[d].append(nearest_distance(features, prof, pair.train, rows_of[c])[1])  # c's distance calibrates d's test
        nested[c].append(nearest_distance(features, prof, pair.train, rows_of[d])[1])
    units, dist = nearest_distance(features, prof, novel_fold.train, novel_fold.test)
    out = [pd.DataFrame({"unit": units, "nn_distance": dist,
                         "p_distance": distance_p_values(dist, np.concatenate([d for _, d in loco.values()]))})]
    for c, (units, dist) in loco.items():
        out.append(pd.DataFrame({"unit": units, "nn_distance": dist, "p_distance": distance_p_values(dist, np.concatenate(nested[c]))}))
    t = pd.concat(out, ignore_index=True)
    return pd.concat([prof.keys.iloc[t["unit"]].reset_index(drop=True), t], axis=1)


def _score_distance(t: pd.DataFrame, dist: pd.DataFrame, novelty_score: str) -> pd.DataFrame:
    """Attach the distance p-values to the softmax-scored units `t` (matched on the units' key
    columns) and make `novelty` / `flagged` the chosen score's."""
    keys = [c for c in dist.columns if c not in ("unit", "nn_distance", "p_distance")]
    if dist.duplicated(keys).any():
        keys = [*keys, "_order"]  # images without unique metadata: match by position within the round instead
        dist, t = dist.assign(_order=np.arange(len(dist))), t.assign(_order=np.arange(len(t)))
    out = t.merge(dist.drop(columns="unit"), on=keys, how="left", validate="one_to_one").drop(columns="_order", errors="ignore")
    if out["p_distance"].isna().any() or len(out) != len(t):
        raise CellmorphError("distance novelty: the distance units do not match the scored units (a bug; please report it).")
    out["novelty_softmax"], out["flagged_softmax"] = out["novelty"], out["flagged"]
    out["novelty_distance"] = 1 - out["p_distance"]
    out["flagged_distance"] = ~in_set(out["p_distance"].to_numpy(), FLAG_CONFIDENCE)
    if novelty_score == "distance":
        out["novelty"], out["flagged"] = out["novelty_distance"], out["flagged_distance"]
    else:
        out["novelty"] = np.maximum(out["novelty_softmax"], out["novelty_distance"])
        out["flagged"] = out["flagged_softmax"] | out["flagged_distance"]
    return out


def _n_heads(fs) -> int:
    k = sum(1 for _, f in fs if f.held_out)
    return 1 + k + k * (k - 1) // 2


def _score_units(Calibrator, test: pd.DataFrame, cal: pd.DataFrame, known_classes, keep, label, group) -> pd.DataFrame:
    """Conformal p-values of `test` units from a Calibrator on `cal` units (known classes only: the
    novel class's probability is 0 in every head of its round)."""
    cols = [f"prob_{c}" for c in known_classes]
    calib = Calibrator.fit(cal[cols].to_numpy(float), cal[label].to_numpy(), known_classes,
                           groups=cal[group].to_numpy() if group in cal.columns else None)
    p = calib.p_values(test[cols].to_numpy(float))
    sets = in_set(p, FLAG_CONFIDENCE)
    out = test.copy()
    out["novelty"] = 1 - p.max(axis=1)
    out["flagged"] = ~sets.any(axis=1)
    out["set_0.9"] = ["|".join(c for c, s in zip(known_classes, row) if s) for row in sets]
    out["calibration"] = calib.describe()["method"]
    return out


def _rates(t: pd.DataFrame) -> dict:
    from sklearn.metrics import roc_auc_score

    nov, kn = t[t["role"] == "novel"], t[t["role"] == "known held-out"]
    both = len(nov) and len(kn)
    return {"novel_units": int(len(nov)), "novel_flagged": int(nov["flagged"].sum()),
            "novel_flag_rate": float(nov["flagged"].mean()) if len(nov) else None,
            "known_units": int(len(kn)), "known_flagged": int(kn["flagged"].sum()),
            "false_flag_rate": float(kn["flagged"].mean()) if len(kn) else None,
            "known_coverage": float(np.mean([str(lab) in s.split("|") for lab, s in zip(kn["_label"], kn["set_0.9"])])) if len(kn) else None,
            "auroc": float(roc_auc_score(t["role"] == "novel", t["novelty"])) if both else None,
            # with the distance score, both components' flags (the combined rule flags when either does)
            **({f"{k}_flagged_{s}": int(g[f"flagged_{s}"].sum()) for s in ("softmax", "distance") for k, g in (("novel", nov), ("known", kn))}
               if "flagged_distance" in t.columns else {}),
            # which known class the plain classifier names for the novel units (argmax): a novel MoA that
            # looks like a known one is called that one with confidence, and conformal sets cannot flag it
            "novel_called": {str(k): int(v) for k, v in nov["predicted"].value_counts().items()} if len(nov) else {}}


def summarize(units: dict[str, pd.DataFrame], label: str, rounds: dict, novelty_score: str = "softmax") -> dict:
    """The novelty block: per level, per novel MoA and overall (units pooled over the rounds; each
    known treatment is scored once per round whose novel MoA is not its own), plus the mean of the
    per-MoA AUROCs. `score` names the novelty score used (evaluation.novelty_score)."""
    calibration = "nested: out-of-fold predictions of the other known compounds, from heads that saw neither the novel MoA nor the held-out compound"
    if novelty_score != "softmax":
        calibration += ("; distances: each other known compound's distance to a reference without the novel MoA, the held-out "
                        "compound and itself (features standardised with that reference's images)")
    out = {"flag_confidence": FLAG_CONFIDENCE, "score": novelty_score, "flag_rule": FLAG_TEXT[novelty_score],
           "novelty_score": SCORE_TEXT[novelty_score], "calibration": calibration,
           "rounds": rounds, "per_moa": {}, "overall": {}}
    if novelty_score != "softmax":
        out["distance"] = {"k": 1, "metric": "cosine (1 - cosine similarity)", "features": "frozen backbone features",
                           "standardisation": "per dimension, mean and SD of the fold's reference (training) images",
                           "profile": "image features; median per well; median of wells per treatment (evaluation.aggregate)",
                           "p_values": "non-smoothed: (#{calibration distances >= distance} + 1) / (n + 1)"}
    for lv, t in units.items():
        t = t.assign(_label=t[label].astype(str))
        per = {m: _rates(g) for m, g in t.groupby("novel_moa", sort=True)}
        for m, r in per.items():
            out["per_moa"].setdefault(m, {})[lv] = r
        aucs = [r["auroc"] for r in per.values() if r["auroc"] is not None]
        out["overall"][lv] = _rates(t) | {"auroc_mean_over_moas": float(np.mean(aucs)) if aucs else None, "n_moas": len(per)}
    return out


def lomo_levels(pred: pd.DataFrame, label: str, levels: list[str], how: str) -> dict:
    """Accuracy etc. of the known held-out compounds, per level: units aggregated within each round
    (a known treatment is scored once per round whose novel MoA is not its own), then pooled."""
    known = labelled_rows(pred[pred["role"] == "known held-out"], label)
    out = {}
    for lv in levels:
        units = pd.concat([aggregate(g.drop(columns=["novel_moa", "role"]), lv, label, how).assign(novel_moa=m)
                           for m, g in known.groupby("novel_moa", sort=True)], ignore_index=True)
        wrong = misclassified(units, lv, label)
        if lv != "image":
            unseen = units.loc[units["predicted"] != units[label], "novel_moa"].tolist()
            wrong = [w | {"unseen MoA": u} for w, u in zip(wrong, unseen)]
        out[lv] = score_level(lv, units[label], units["predicted"], wrong)
    return out


FROZEN_ONLY = ("its nested calibration fits about 730 models on the BBBC021 subset (1 + K + K(K-1)/2 per novel MoA with K known compounds), "
               "cheap as logistic heads on cached features but hundreds of fine-tunes. Set mode = \"frozen\", or use protocol loco for a "
               "fine-tuned model's conformal coverage.")


def run_lomo_seed(features: np.ndarray, y: np.ndarray, df: pd.DataFrame, folds: list[NovelFold], classes: list[str], label: str,
                  levels: list[str], description: str, excluded: list[dict], cfg, seed: int, progress=None) -> tuple[pd.DataFrame, Metrics, dict[str, pd.DataFrame]]:
    """The runner's hook for `lomo` (Protocol.runner): every head of one seed in memory (`run_lomo`), its
    Metrics with the `novelty` block, and the scored units per level as {file name: table}
    (novelty_<level>s.csv, which a run folder writes)."""
    ev = cfg.evaluation
    pred, block, units = run_lomo(features, y, df, folds, classes, label, levels, ev.aggregate, cfg.frozen.C, cfg.frozen.class_weight, seed,
                                  progress=progress, novelty_score=ev.novelty_score)
    m = Metrics(protocol="lomo", protocol_description=description, classes=list(classes),
                levels=lomo_levels(pred, label, levels, ev.aggregate), excluded=excluded, seeds=[seed], novelty=block)
    return pred, m, {f"novelty_{lv}s.csv": t for lv, t in units.items()}


def _describe(group: str, ev, folds: list[NovelFold]) -> str:
    moas = sorted({f.novel for f in folds})
    return (f"leave-one-MoA-out: {len(moas)} rounds, each MoA unseen by every model of its round (its images scored as novel), "
            f"and in each round leave-one-compound-out over the known MoAs' compounds ({sum(1 for f in folds if f.held_out)} folds), "
            f"calibrated on nested out-of-fold predictions")


register_protocol("lomo", Protocol(lambda df, g, ev, label: lomo_folds(df, label, g), default_group="Metadata_Compound", needs_label=True,
                                   what=_describe, fold_word="outer folds", runner=run_lomo_seed, frozen_only=FROZEN_ONLY))
