"""Conformal prediction sets and calibrated p-values for cellmorph's classifiers.

A classifier's softmax says "DNA damage, 0.7", but not how often such a call is right, and it
always names one of the classes it was trained on. Conformal prediction turns the probabilities
into a p-value per class, computed against *calibration units* whose true class is known: the
cross-validation's out-of-fold predictions, where each compound was scored by a model that never
saw it, so a calibration unit is exchangeable with a new compound on a new plate. From the
p-values come

- prediction sets at a confidence c: every class whose p-value exceeds 1 - c. Under
  exchangeability the true class is in the set with probability >= c (Vovk et al. 2005);
- a novelty score, 1 - the largest p-value: high when the unit looks like none of the classes;
- the flag "none of the known MoAs" at confidence c: **the prediction set at c is empty**
  (every class has p-value <= 1 - c), i.e. novelty >= c.

Choices, fixed before any number was seen:

- Unit: the treatment (compound x concentration) is what is exchangeable, not the image: its
  probabilities are the paper's median over images -> wells -> treatment (`level_table`), and
  its nonconformity score is computed from those aggregated probabilities. Images and wells can
  be calibrated the same way, each as a unit of its own level.
- Nonconformity score: 1 - the probability of the class (crepes' `hinge`).
- p-values: non-smoothed, (#{calibration scores >= score} + 1) / (n + 1): deterministic and
  conservative (coverage >= c, at most c + 1/(n + 1)).
- Mondrian (class-conditional): a class gets its own calibration bin when it has at least
  `min_per_class` calibration units (counted in distinct `groups`, e.g. compounds, when groups
  are given: images of one compound are not exchangeable with each other). The classes below
  that share ONE pooled bin (all of them: ordinary, marginal conformal prediction). With fewer
  than ~20 units a bin's smallest p-value, 1/(n + 1), cannot go below 0.05, so the class could
  never be excluded at 0.95: too few units make class-conditional sets uninformative, not
  safer. On the BBBC021 6-MoA subset (2-4 compounds, 6-12 treatments per MoA) every class is
  pooled: the guarantee is marginal over classes, not per class.

Library: crepes (Boström, `crepes.ConformalClassifier`) computes the p-values. It was chosen over
MAPIE because it takes precomputed probabilities and Mondrian bins directly and returns p-values
per class (which the novelty score needs); MAPIE 1.x wraps an estimator and returns sets at
given levels, and TorchCP works on torch tensors of a model we do not have at calibration time.

Example:
    >>> units = level_table(oof_predictions, "Metadata_MoA", "treatment")
    >>> probs = units[[f"prob_{c}" for c in classes]].to_numpy()
    >>> cal = Calibrator.fit(probs, units["Metadata_MoA"].to_numpy(), classes,
    ...                      groups=units["Metadata_Compound"].to_numpy())
    >>> sets = cal.prediction_sets(new_probs, 0.9)   # n x K bool
    >>> flagged = ~sets.any(axis=1)                  # "none of the known MoAs" at 0.9
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellmorph.data.table import labelled_rows
from cellmorph.evaluation.aggregate import aggregate, prob_columns
from cellmorph.evaluation.calibration import cross_fitted, fit_temperature
from cellmorph.evaluation.stats import mean_sem
from cellmorph.errors import CellmorphError

__all__ = ["CONFIDENCES", "Calibrator", "MIN_PER_CLASS", "level_table", "nonconformity"]

CONFIDENCES = (0.8, 0.9, 0.95)  # the levels every run reports
MIN_PER_CLASS = 20  # calibration units (or groups) a class needs for a Mondrian bin of its own
POOLED = -1  # the bin shared by the classes with fewer units
NONCONFORMITY = "1 - probability of the class (crepes.extras.hinge)"
P_VALUES = "non-smoothed: (#{calibration scores >= score} + 1) / (n + 1)"


def level_table(pred: pd.DataFrame, label: str, level: str, how: str = "median") -> pd.DataFrame:
    """Units of `level` ("image" | "well" | "treatment") from image rows with prob_<class> columns.

    `aggregate.aggregate` underneath (the paper's median: images -> wells -> treatments). Returns
    one row per unit: its key Metadata_ columns, `label` (NaN for unlabelled units; added as NaN
    when the predictions have no label column at all, e.g. a new plate), prob_<class>, n and
    predicted.

    Example:
        >>> level_table(pred, "Metadata_MoA", "treatment").columns[:3].tolist()
        ['Metadata_Compound', 'Metadata_Concentration', 'Metadata_MoA']
    """
    if not prob_columns(pred):
        raise CellmorphError("predictions have no prob_<class> columns: nothing to calibrate or predict.")
    if label not in pred.columns:
        pred = pred.assign(**{label: np.nan})
    return aggregate(pred, level, label, how)


def nonconformity(probs: np.ndarray) -> np.ndarray:
    """n x K nonconformity scores, 1 - probability of each class (crepes' hinge)."""
    from crepes.extras import hinge

    return hinge(np.asarray(probs, dtype=float))


def _check_probs(probs, n_classes: int, what: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise CellmorphError(f"{what}: expected an n x {n_classes} array of class probabilities, got shape {probs.shape}.")
    if not np.isfinite(probs).all():
        raise CellmorphError(f"{what}: the probabilities hold NaN or infinite values; check the prob_<class> columns.")
    return probs


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise CellmorphError(f"confidence {confidence!r} must lie strictly between 0 and 1, e.g. 0.9.")
    return float(confidence)


def in_set(p_values: np.ndarray, confidence: float) -> np.ndarray:
    """Which classes are in the prediction set at `confidence`: p-value > 1 - confidence.

    The significance 1 - confidence is rounded to 12 decimals first: in floating point 1 - 0.9 is
    0.09999999999999998, which would let a p-value of exactly 0.1 (2 of 20) into the set and turn a
    90% set into a 95% one.

    >>> in_set(np.array([[0.1, 0.15]]), 0.9)
    array([[False,  True]])"""
    return np.asarray(p_values) > round(1 - _check_confidence(confidence), 12)


@dataclass
class Calibrator:
    """Conformal calibration from labelled calibration units (out-of-fold probabilities).

    Mondrian (class-conditional) for classes with >= `min_per_class` calibration units (distinct
    `groups` when given); the other classes share one pooled bin: their p-values are computed
    against the scores of all units of those classes together (when every class is below the
    threshold that is ordinary, marginal conformal prediction). `describe()` says which.

    Example:
        >>> cal = Calibrator.fit(probs, y, ["a", "b", "c"], groups=compounds)
        >>> cal.p_values(new_probs).shape, cal.describe()["method"]
        ((4, 3), 'pooled (marginal)')
    """

    classes: list[str]
    scores: np.ndarray  # calibration nonconformity scores, one per unit
    bins: np.ndarray  # the Mondrian bin of each calibration unit
    class_bin: dict[str, int]  # class -> its bin (its own index, or POOLED)
    counts: dict[str, dict] = field(default_factory=dict)
    min_per_class: int = MIN_PER_CLASS
    _cc: object = None

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray, classes: list[str], *, min_per_class: int = MIN_PER_CLASS,
            groups: np.ndarray | None = None) -> Calibrator:
        """Calibrate on units with known class `y` (class names; NaN/empty = unlabelled, dropped).

        Args:
            probs: n x K probabilities, columns in `classes` order (out-of-fold: from models that
                never saw the unit's compound).
            y: the true class name of each unit.
            classes: the K class names.
            min_per_class: calibration units (or groups) a class needs for a bin of its own.
            groups: the exchangeable group of each unit (e.g. its compound), used to count.
        """
        from crepes import ConformalClassifier

        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes) or not classes:
            raise CellmorphError(f"calibration classes must be distinct and non-empty, got {classes}.")
        probs = _check_probs(probs, len(classes), "calibration")
        y = pd.Series(np.asarray(y, dtype=object))
        if len(y) != len(probs):
            raise CellmorphError(f"calibration: {len(probs)} probability rows but {len(y)} labels.")
        known = (y.notna() & (y.astype(str).str.strip() != "")).to_numpy()
        if not known.any():
            raise CellmorphError("calibration needs labelled units, but none of the calibration units has a label; "
                                 "calibrate on the out-of-fold predictions of a labelled run.")
        names = y[known].astype(str).to_numpy()
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise CellmorphError(f"calibration labels {unknown} are not among the model's classes {classes}; "
                                 "calibrate with the predictions of the same model (same classes).")
        idx = np.array([classes.index(n) for n in names])
        g = None if groups is None else np.asarray(groups, dtype=object)[known].astype(str)
        if groups is not None and len(groups) != len(y):
            raise CellmorphError(f"calibration: {len(y)} units but {len(groups)} group values.")
        counts, class_bin = {}, {}
        for k, c in enumerate(classes):
            mine = idx == k
            n_groups = len(set(g[mine])) if g is not None else None
            enough = (n_groups if g is not None else int(mine.sum())) >= min_per_class
            class_bin[c] = k if enough else POOLED
            counts[c] = {"units": int(mine.sum()), **({"groups": n_groups} if g is not None else {}), "bin": "own" if enough else "pooled"}
        scores = nonconformity(probs[known])[np.arange(len(idx)), idx]
        bins = np.array([class_bin[classes[k]] for k in idx])
        cc = ConformalClassifier().fit(scores, bins=bins)
        return cls(classes, scores, bins, class_bin, counts, min_per_class, cc)

    def p_values(self, probs: np.ndarray) -> np.ndarray:
        """n x K: the conformal p-value of each class for each unit (in `classes` order)."""
        probs = _check_probs(probs, len(self.classes), "p-values")
        alphas = nonconformity(probs)
        out = np.ones(alphas.shape)
        for b in sorted(set(self.class_bin.values())):
            cols = [k for k, c in enumerate(self.classes) if self.class_bin[c] == b]
            if len(probs):
                out[:, cols] = self._cc.predict_p(alphas[:, cols], bins=np.full(len(probs), b), smoothing=False)
        return out

    def prediction_sets(self, probs: np.ndarray, confidence: float) -> np.ndarray:
        """n x K bool: class k is in a unit's set at `confidence` when its p-value > 1 - confidence."""
        return in_set(self.p_values(probs), confidence)

    def novelty(self, probs: np.ndarray) -> np.ndarray:
        """n: 1 - the largest p-value (higher = less like any known class). A unit is flagged as
        "none of the known classes" at confidence c when novelty >= c (its set at c is empty)."""
        return 1 - self.p_values(probs).max(axis=1)

    def describe(self) -> dict:
        """What was calibrated: method, library, score, p-values, and per class its units and bin."""
        from importlib.metadata import version

        own = [c for c, b in self.class_bin.items() if b != POOLED]
        if len(own) == len(self.classes):
            method = "mondrian (class-conditional)"
        elif own:
            method = f"mondrian for {', '.join(own)}; the other classes share one pooled bin"
        else:
            method = "pooled (marginal)"
        return {"method": method, "library": f"crepes {version('crepes')}", "nonconformity": NONCONFORMITY, "p_values": P_VALUES,
                "min_per_class": self.min_per_class, "n_units": int(len(self.scores)), "classes": self.counts}


# --- evaluation: leave-one-group-out conformal over out-of-fold predictions ---------------------------


def ece(probs: np.ndarray, true_idx: np.ndarray, n_bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of the top class (Guo et al. 2017: equal-width confidence bins,
    sum over bins of |accuracy - mean confidence| weighted by the bin's share) and the reliability
    table (per non-empty bin: lo, hi, n, confidence, accuracy).

    Written here rather than taken from a library: scikit-learn's calibration_curve is binary only,
    and torchmetrics would add a dependency for ten lines.

    >>> ece(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]))[0]
    0.35"""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.asarray(true_idx)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total, table = 0.0, []
    for b in range(n_bins):
        m = which == b
        if not m.any():
            continue
        acc, c = float(right[m].mean()), float(conf[m].mean())
        total += m.sum() / len(conf) * abs(acc - c)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()), "confidence": c, "accuracy": acc})
    return float(total), table


MAX_GROUP_FOLDS = 50  # more exchangeable groups than this: calibrate in 20 folds of groups instead of one per group
GROUP_FOLDS = 20


def _group_folds(groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fold number per unit: one fold per group, or 20 seeded folds of whole groups when there are
    more than 50 groups (e.g. one group per image under a random split): calibrating on 95% of the
    other units instead of all of them, at a fraction of the cost."""
    names, inverse = np.unique(groups.astype(str), return_inverse=True)
    if len(names) <= MAX_GROUP_FOLDS:
        return inverse
    fold_of_group = np.random.default_rng(seed).permutation(len(names)) % GROUP_FOLDS
    return fold_of_group[inverse]


def cross_conformal_p_values(probs: np.ndarray, y: np.ndarray, classes: list[str], groups: np.ndarray,
                             min_per_class: int = MIN_PER_CLASS) -> tuple[np.ndarray, list[str]]:
    """Leave-one-group-out p-values: for each group (e.g. compound), a Calibrator fitted on the other
    groups' units gives the p-values of this group's units. Returns the n x K p-values and the
    calibration method of each fold (Calibrator.describe()["method"]).

    >>> p, methods = cross_conformal_p_values(probs, y, classes, compounds)"""
    folds = _group_folds(np.asarray(groups, dtype=object))
    p = np.ones((len(probs), len(classes)))
    methods = []
    for f in np.unique(folds):
        test = folds == f
        cal = Calibrator.fit(probs[~test], y[~test], classes, min_per_class=min_per_class, groups=groups[~test])
        p[test] = cal.p_values(probs[test])
        methods.append(cal.describe()["method"])
    return p, methods


def set_scores(p: np.ndarray, true_idx: np.ndarray, classes: list[str], confidences=CONFIDENCES) -> dict:
    """Per confidence: coverage (true class in the set), mean set size, empty sets (flagged as none of
    the classes), singletons, and coverage per true class, from p-values and the true classes."""
    out = {}
    for c in confidences:
        sets = in_set(p, c)
        covered = sets[np.arange(len(p)), true_idx]
        sizes = sets.sum(axis=1)
        per_class = {cls: {"covered": int(covered[true_idx == k].sum()), "total": int((true_idx == k).sum()),
                           "coverage": float(covered[true_idx == k].mean())}
                     for k, cls in enumerate(classes) if (true_idx == k).any()}
        out[f"{c:g}"] = {"coverage": float(covered.mean()), "covered": int(covered.sum()), "total": int(len(p)),
                         "mean_set_size": float(sizes.mean()), "empty": int((sizes == 0).sum()), "singletons": int((sizes == 1).sum()),
                         "per_class": per_class}
    return out


def evaluate(pred: pd.DataFrame, label: str, levels: list[str], how: str = "median", group: str = "",
             confidences=CONFIDENCES, min_per_class: int = MIN_PER_CLASS) -> dict:
    """The `conformal` block of a run's metrics: per level, leave-one-group-out coverage and set size
    at each confidence, and the expected calibration error of the plain (aggregated) softmax.

    `pred` holds one seed's out-of-fold image predictions (labelled rows are used, the rest are
    ignored). `group` is the column whose units are exchangeable (the protocol's: the compound under
    loco/lcbo); "" = each unit is its own group (a random split). For each group, a Calibrator
    fitted on the OTHER groups' units scores this group's units. A level whose units lack the
    column, or with fewer than 2 groups, is skipped with the reason.

    >>> block = evaluate(pred, "Metadata_MoA", ["image", "well", "treatment"], group="Metadata_Compound")
    >>> block["levels"]["treatment"]["by_confidence"]["0.9"]["covered"]  # the quickstart's, seed 0
    50"""
    from importlib.metadata import version

    classes = [c.removeprefix("prob_") for c in prob_columns(pred)]
    scored = labelled_rows(pred, label)
    block = {"library": f"crepes {version('crepes')}", "nonconformity": NONCONFORMITY, "p_values": P_VALUES,
             "min_per_class": min_per_class, "group": group or "(each unit)", "confidences": list(confidences),
             "evaluation": (f"leave-one-{group or 'unit'}-out over the out-of-fold predictions: for each {group or 'unit'}, calibrated on "
                            f"the other {group or 'unit'}s' units, tested on its own; a unit is in its set when its class p-value > 1 - confidence"),
             "levels": {}, "skipped": {}}
    outside = sorted(set(scored[label]) - set(classes))
    if outside:
        block["skipped"]["all"] = f"labels {outside} have no prob_<class> column"
        return block
    for lv in levels:
        units = level_table(scored, label, lv, how)
        if group and group not in units.columns:
            block["skipped"][lv] = f"the {lv} units do not carry the group column {group}"
            continue
        groups = units[group].astype(str).to_numpy() if group else np.arange(len(units)).astype(str)
        if len(set(groups)) < 2:
            block["skipped"][lv] = f"fewer than 2 groups ({group or 'units'}) to calibrate on"
            continue
        probs = units[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
        y = units[label].astype(str).to_numpy()
        true_idx = np.array([classes.index(v) for v in y])
        p, methods = cross_conformal_p_values(probs, y, classes, groups, min_per_class)
        e, table = ece(probs, true_idx)
        scaled, temps = cross_fitted(probs, true_idx, _group_folds(groups))
        e_scaled, table_scaled = ece(scaled, true_idx)
        full = Calibrator.fit(probs, y, classes, min_per_class=min_per_class, groups=groups)
        block["levels"][lv] = {
            "n_units": int(len(units)), "n_groups": int(len(set(groups))), "n_calibrations": len(methods),
            "methods": sorted(set(methods)), "calibration_all_units": full.describe()["classes"],
            "ece": e, "reliability": table, "by_confidence": set_scores(p, true_idx, classes, confidences),
            "ece_scaled": e_scaled, "reliability_scaled": table_scaled,
            "temperature": {"all_units": fit_temperature(probs, true_idx), "folds_min": min(temps), "folds_median": float(np.median(temps)),
                            "folds_max": max(temps), "n_fits": len(temps)}}
    block["temperature_scaling"] = (f"ece_scaled: the ECE after temperature scaling (cellmorph.evaluation.calibration), each {group or 'unit'}'s "
                                    f"units tempered with the T fitted (NLL) on the other {group or 'unit'}s' units; the prediction sets use "
                                    "the unscaled probabilities (scaling changes no predicted class)")
    return block


def combine(blocks: list[dict]) -> dict:
    """One conformal block for several seeds: per level and confidence, coverage and mean set size as
    the mean over seeds with their SEM (`coverage_sem`, `mean_set_size_sem`), covered/total/empty
    summed; ECE likewise (`ece_sem`). Levels not scored by every seed are dropped.

    >>> combine([m.conformal for m in per_seed])["levels"]["treatment"]["by_confidence"]["0.9"]["coverage_sem"]"""
    blocks = [b for b in blocks if b]
    if len(blocks) <= 1:
        return dict(blocks[0]) if blocks else {}
    first = blocks[0]
    out = {k: v for k, v in first.items() if k not in ("levels",)} | {"levels": {}, "n_seeds": len(blocks)}
    for lv, s0 in first["levels"].items():
        if not all(lv in b["levels"] for b in blocks):
            continue
        runs = [b["levels"][lv] for b in blocks]
        e, e_sem = mean_sem([r["ece"] for r in runs])
        scaled = [r["ece_scaled"] for r in runs if r.get("ece_scaled") is not None]
        es, es_sem = mean_sem(scaled) if len(scaled) == len(runs) else (None, None)
        by = {}
        for c in s0["by_confidence"]:
            rs = [r["by_confidence"][c] for r in runs]
            cov, cov_sem = mean_sem([r["coverage"] for r in rs])
            size, size_sem = mean_sem([r["mean_set_size"] for r in rs])
            by[c] = {"coverage": cov, "coverage_sem": cov_sem, "mean_set_size": size, "mean_set_size_sem": size_sem,
                     **{k: sum(r[k] for r in rs) for k in ("covered", "total", "empty", "singletons")}}
        out["levels"][lv] = {**{k: s0[k] for k in ("n_units", "n_groups", "n_calibrations", "calibration_all_units")},
                             "methods": sorted({m for r in runs for m in r["methods"]}), "ece": e, "ece_sem": e_sem,
                             "ece_scaled": es, "ece_scaled_sem": es_sem,
                             "reliability": s0["reliability"], "reliability_seed": "first seed", "by_confidence": by}
    return out


def summary_line(block: dict) -> str:
    """One console line: coverage and mean set size at 0.9 per level (most aggregated first), and ECE."""
    if not block or not block.get("levels"):
        why = "; ".join(f"{k}: {v}" for k, v in (block or {}).get("skipped", {}).items()) or "not computed"
        return f"conformal: skipped ({why})"
    parts = []
    for lv in ("treatment", "well", "image"):
        s = block["levels"].get(lv)
        if s and "0.9" in s["by_confidence"]:
            b = s["by_confidence"]["0.9"]
            scaled = f" ({s['ece_scaled']:.3f} temperature-scaled)" if s.get("ece_scaled") is not None else ""
            parts.append(f"{lv} coverage {b['coverage']:.1%} ({b['covered']}/{b['total']}), set size {b['mean_set_size']:.2f}, ECE {s['ece']:.3f}{scaled}")
    unit = block["group"] if not block["group"].startswith("(") else "unit"
    return f"conformal sets at 0.9 (leave-one-{unit}-out): " + "; ".join(parts)
