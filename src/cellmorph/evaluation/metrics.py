"""Typed results: accuracy, balanced accuracy and macro-F1 per level (image, well, treatment),
with the counts they rest on, per class, and over seeds; plus the conformal evaluation (coverage
and set size per level and confidence, ECE: cellmorph.evaluation.conformal.evaluate) and, for the `lomo`
protocol, the novelty evaluation (cellmorph.evaluation.novelty).

`Metrics` is the one reader and writer of metrics.json: the CLI, the report and `summarize` take
their numbers from it and never rebuild keys by hand."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.table import labelled_rows
from cellmorph.evaluation.conformal import combine as combine_conformal
from cellmorph.evaluation.novelty import combine as combine_novelty
from cellmorph.evaluation.stats import mean_sem
from cellmorph.evaluation.aggregate import LEVELS, aggregate, available_levels, prob_columns
from cellmorph.errors import CellmorphError
from cellmorph.io import write_json

__all__ = [
    "LEVELS", "LevelScore", "Metrics", "aggregate", "available_levels", "balance_line", "class_balance", "combine_seeds", "compute_metrics",
    "confusion", "score_level",
]

FORMAT = 1  # metrics.json layout version; files without it come from an older cellmorph
_REFRESH = "Rerun the run (`cellmorph run CONFIG --out RUN_FOLDER`) to rewrite it."


@dataclass
class LevelScore:
    """Scores at one level. per_class holds the classes present in the truth (precision None for a
    class never predicted); macro_f1 averages over the classes present in truth or prediction."""

    level: str
    correct: int
    total: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    per_class: dict[str, dict]
    misclassified: list[dict]


@dataclass
class Metrics:
    """A run's results, as written to and read from metrics.json (`write`, `read`)."""

    protocol: str
    protocol_description: str
    classes: list[str]
    levels: dict[str, LevelScore]
    context: dict = field(default_factory=dict)
    excluded: list[dict] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    per_seed: list[Metrics] = field(default_factory=list)
    spread: dict[str, dict] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    # cellmorph.evaluation.conformal.evaluate's block: per level, leave-one-compound-out coverage and mean set
    # size at 0.8/0.9/0.95, ECE and the reliability table ({} when not computed; "skipped" says why).
    conformal: dict = field(default_factory=dict)
    # cellmorph.evaluation.novelty's block under the `lomo` protocol: per novel MoA and overall, flag rates and AUROC.
    novelty: dict = field(default_factory=dict)

    @property
    def headline_level(self) -> str:
        """The most aggregated level scored: treatment, else well, else image."""
        scored = [lv for lv in LEVELS if lv in self.levels]
        if not scored:
            raise CellmorphError(f"these metrics ({self.protocol}) score no level at all.")
        return scored[-1]

    def level(self, name: str) -> LevelScore:
        if name not in self.levels:
            raise CellmorphError(f"no {name!r} level in these metrics: scored {', '.join(self.levels) or 'none'}.")
        return self.levels[name]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, per_seed=[]))
        d["per_seed"] = [s.to_dict() for s in self.per_seed]
        return {"format": FORMAT, **_json_safe(d)}

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        if not isinstance(d, dict) or d.get("format") != FORMAT or "levels" not in d:
            raise CellmorphError(f"not a metrics file of this cellmorph (format {FORMAT}; written by an older version?). {_REFRESH}")
        try:
            return cls(
                protocol=d["protocol"],
                protocol_description=d["protocol_description"],
                classes=list(d["classes"]),
                levels={k: LevelScore(**v) for k, v in d["levels"].items()},
                context=d.get("context", {}),
                excluded=d.get("excluded", []),
                seeds=d.get("seeds", []),
                per_seed=[cls.from_dict(s) for s in d.get("per_seed", [])],
                spread=d.get("spread", {}),
                curve=d.get("curve", []),
                conformal=d.get("conformal", {}),
                novelty=d.get("novelty", {}),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise CellmorphError(f"metrics file is incomplete ({type(err).__name__}: {err}). {_REFRESH}") from None

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> Metrics:
        """Load a run's metrics.json, with an error naming the file when it is missing or unusable.

        >>> Metrics.read("runs/quickstart/metrics.json").level("treatment").accuracy
        1.0"""
        path = Path(path)
        if not path.is_file():
            raise CellmorphError(f"{path}: not found. Is {path.parent} a finished run folder? (Rerun `cellmorph run` with --out {path.parent} to finish it.)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CellmorphError(f"{path}: not valid JSON ({err}); the file is damaged. {_REFRESH}") from None
        try:
            return cls.from_dict(d)
        except CellmorphError as err:
            raise CellmorphError(f"{path}: {err}") from None

    def summary_line(self) -> str:
        """One console line: the headline level, then images, each with balanced accuracy and macro-F1."""
        shown = [self.headline_level] + (["image"] if self.headline_level != "image" and "image" in self.levels else [])
        n = len(self.seeds)
        parts = []
        for lv in shown:
            s = self.levels[lv]
            sp = self.spread.get(lv, {})
            if n > 1 and sp:
                parts.append(
                    f"{lv} accuracy {_pct_pm(sp['accuracy_mean'], sp['accuracy_sem'])} ({s.correct}/{s.total} over {n} seeds), "
                    f"balanced {_pct_pm(sp['balanced_accuracy_mean'], sp['balanced_accuracy_sem'])}, "
                    f"macro-F1 {sp['macro_f1_mean']:.3f} ± {sp['macro_f1_sem']:.3f}"
                )
            else:
                parts.append(f"{lv} accuracy {s.accuracy:.1%} ({s.correct}/{s.total}), balanced {s.balanced_accuracy:.1%}, macro-F1 {s.macro_f1:.3f}")
        tail = f"{self.protocol}, mean ± SEM over {n} seeds" if n > 1 and self.spread else self.protocol
        return "; ".join(parts) + f" ({tail})"


    def recall_line(self, level: str = "image", limit: int = 12) -> str:
        """One console line: recall per true class at `level`, lowest first (the classes a model misses
        show first), with the counts; the rest summed up beyond `limit` classes.

        >>> Metrics.read("runs/quickstart/metrics.json").recall_line()
        'recall per class (images), lowest first: DNA damage 72.9% (105/144), ...'"""
        if level not in self.levels:
            return ""
        pc = self.levels[level].per_class
        rows = sorted(pc.items(), key=lambda kv: (kv[1]["recall"], kv[0]))
        shown = [f"{c} {v['recall']:.1%} ({round(v['recall'] * v['support'])}/{v['support']})" for c, v in rows[:limit]]
        more = f", and {len(rows) - limit} more classes" if len(rows) > limit else ""
        seeds = f", seed {self.seeds[0]}" if len(self.seeds) > 1 else ""
        return f"recall per class ({level}s{seeds}), lowest first: " + ", ".join(shown) + more


def class_balance(labels, weighted: bool, setting: str) -> dict:
    """How unequal the classes are (labelled images per class), whether training weighs them, and the config field
    that switches the weights (`setting`).

    >>> class_balance(["a"] * 30 + ["b"] * 10, True, 'frozen.class_weight = "none"')["ratio"]
    3.0"""
    counts = pd.Series(np.asarray(labels, dtype=object).astype(str)).value_counts()
    return {"images": {str(k): int(v) for k, v in counts.sort_index().items()}, "largest": str(counts.index[0]), "smallest": str(counts.index[-1]),
            "ratio": round(float(counts.iloc[0] / counts.iloc[-1]), 2), "weighted": bool(weighted), "setting": setting}


def balance_line(b: dict) -> str:
    """One console line on class imbalance (`class_balance`): said whenever the largest class has more than twice
    the images of the smallest, with what the training does about it and the field that switches it."""
    if not b or b["ratio"] <= 2:
        return ""
    n, setting = b["images"], b["setting"]
    head = f"classes differ {b['ratio']:.1f}x in images ({b['largest']} {n[b['largest']]}, {b['smallest']} {n[b['smallest']]})"
    if b["weighted"]:
        return f"{head}: class weights on (balanced: each class counts equally in the loss; {setting} turns them off)"
    return f"{head}: class weights are OFF ({setting}); small classes will be missed more often. Recall per class is above."


def _pct_pm(mean: float, sem: float | None) -> str:
    return f"{mean:.1%}" + ("" if sem is None else f" ± {sem:.1%}")


def _json_safe(x):
    """Plain JSON types only: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def score_level(level: str, true, predicted, misclassified: list[dict] | None = None) -> LevelScore:
    """Accuracy, balanced accuracy (mean recall over the true classes) and macro-F1 (over classes in
    truth or prediction, as sklearn's f1_score(average="macro")) of one level's units."""
    t = np.asarray(true, dtype=object).astype(str)
    p = np.asarray(predicted, dtype=object).astype(str)
    right = t == p
    per_class, f1s = {}, []
    for c in sorted(set(t) | set(p)):
        tp, in_truth, in_pred = int((right & (t == c)).sum()), int((t == c).sum()), int((p == c).sum())
        f1 = 2 * tp / (in_truth + in_pred)
        f1s.append(f1)
        if in_truth:
            per_class[c] = {"support": in_truth, "recall": tp / in_truth, "precision": tp / in_pred if in_pred else None, "f1": f1}
    return LevelScore(
        level=level,
        correct=int(right.sum()),
        total=int(len(t)),
        accuracy=float(right.mean()),
        balanced_accuracy=float(np.mean([v["recall"] for v in per_class.values()])),
        macro_f1=float(np.mean(f1s)),
        per_class=per_class,
        misclassified=misclassified or [],
    )


def misclassified(units: pd.DataFrame, level: str, label: str) -> list[dict]:
    if level == "image":
        return []  # too many to list; the confusion matrix shows them
    wrong = units[units["predicted"] != units[label]]
    if level == "treatment":
        cols = {"Metadata_Compound": "compound", "Metadata_Concentration": "concentration"}
    else:
        cols = {**({"Metadata_Plate": "plate"} if "Metadata_Plate" in units.columns else {}), "Metadata_Well": "well"}
    out = wrong[list(cols)].rename(columns=cols).assign(true=wrong[label], predicted=wrong["predicted"])
    if "concentration" in out.columns:
        out["concentration"] = out["concentration"].astype(float)
    return _json_safe(out.to_dict("records"))


def compute_metrics(pred: pd.DataFrame, label: str, protocol: str, protocol_description: str = "", levels="auto", how: str = "median") -> Metrics:
    """Score predictions at every level the table allows (or the `levels` asked for).

    `pred` has one row per image: Metadata_* columns, `label`, prob_<class> (classes = their names)
    and maybe fold and seed. Unlabelled rows are dropped before scoring at every level. Several
    seeds in a "seed" column are scored apart and combined (`combine_seeds`), never pooled.

    >>> m = compute_metrics(pred, "Metadata_MoA", "loco")
    >>> m.level("treatment").accuracy, m.headline_level
    (1.0, 'treatment')"""
    classes = [c.removeprefix("prob_") for c in prob_columns(pred)]
    if not classes:
        raise CellmorphError("predictions have no prob_<class> columns: nothing to score.")
    scored = labelled_rows(pred, label)
    if scored.empty:
        raise CellmorphError(f"no row of the predictions has a label in {label!r}: nothing to score.")
    wanted = available_levels(scored, levels)
    if "seed" in scored.columns and scored["seed"].nunique() > 1:
        return combine_seeds(
            [compute_metrics(g, label, protocol, protocol_description, wanted, how) for _, g in scored.groupby("seed", sort=True)]
        )
    result = {}
    for lv in wanted:
        units = aggregate(scored, lv, label, how)
        result[lv] = score_level(lv, units[label], units["predicted"], misclassified(units, lv, label))
    seeds = [int(scored["seed"].iloc[0])] if "seed" in scored.columns else []
    return Metrics(protocol=protocol, protocol_description=protocol_description, classes=classes, levels=result, seeds=seeds)


def _spread(runs: list[Metrics], levels: list[str]) -> dict[str, dict]:
    out = {}
    for lv in levels:
        d = {}
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            vals = [getattr(m.levels[lv], k) for m in runs]
            d[f"{k}_mean"], d[f"{k}_sem"] = mean_sem(vals)
        out[lv] = d | {"n_seeds": len(runs)}
    return out


def _mean_or_none(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _combined_level(lv: str, runs: list[Metrics]) -> LevelScore:
    scores = [m.levels[lv] for m in runs]
    per_class = {}
    for c in sorted({c for s in scores for c in s.per_class}):
        rows = [s.per_class[c] for s in scores if c in s.per_class]
        per_class[c] = {
            "support": sum(r["support"] for r in rows),
            **{k: _mean_or_none([r[k] for r in rows]) for k in ("recall", "precision", "f1")},
        }
    return LevelScore(
        level=lv,
        correct=sum(s.correct for s in scores),
        total=sum(s.total for s in scores),
        accuracy=float(np.mean([s.accuracy for s in scores])),
        balanced_accuracy=float(np.mean([s.balanced_accuracy for s in scores])),
        macro_f1=float(np.mean([s.macro_f1 for s in scores])),
        per_class=per_class,
        misclassified=[w for m, s in zip(runs, scores) for w in ([{"seed": m.seeds[0]} | x for x in s.misclassified] if len(m.seeds) == 1 else s.misclassified)],
    )


def combine_seeds(per_seed: list[Metrics]) -> Metrics:
    """One Metrics for several seeds of one setting (inputs that hold per_seed are unpacked).

    levels: per level, accuracy, balanced accuracy and macro-F1 are the MEAN over seeds, while
    correct/total are SUMMED over seeds (so correct/total is the pooled ratio, which equals the
    mean when every seed scores the same units); per-class recall/precision/F1 are means over the
    seeds that have the class, supports are summed. spread: mean and SEM (ddof=1; None for one
    seed). Only the levels every seed scored are kept; curve points are concatenated.

    >>> m = combine_seeds([Metrics.read(f"runs/s{s}/metrics.json") for s in (0, 1, 2)])
    >>> m.spread["treatment"]["accuracy_mean"], m.spread["treatment"]["accuracy_sem"]
    (0.96, 0.011)"""
    runs = [s for m in per_seed for s in (m.per_seed or [m])]
    if not runs:
        raise CellmorphError("combine_seeds needs at least one Metrics.")
    first = runs[0]
    for m in runs[1:]:
        if m.protocol != first.protocol or m.classes != first.classes:
            raise CellmorphError(
                f"cannot combine seeds of different settings: protocol {m.protocol} vs {first.protocol}, "
                f"classes {m.classes} vs {first.classes}. Combine runs of one config only."
            )
    levels = [lv for lv in LEVELS if all(lv in m.levels for m in runs)]
    if len(runs) == 1:
        return dataclasses.replace(first, spread=_spread(runs, levels))
    curve = [p if "seed" in p or len(m.seeds) != 1 else {"seed": m.seeds[0]} | p for m in runs for p in m.curve]
    return Metrics(
        protocol=first.protocol,
        protocol_description=first.protocol_description,
        classes=list(first.classes),
        levels={lv: _combined_level(lv, runs) for lv in levels},
        context=dict(first.context),
        excluded=list(first.excluded),  # the protocol's groups: the same for every seed
        seeds=[s for m in runs for s in m.seeds],
        per_seed=runs,
        spread=_spread(runs, levels),
        curve=curve,
        conformal=combine_conformal([m.conformal for m in runs]),
        novelty=combine_novelty([m.novelty for m in runs]),
    )


def confusion(true: list[str] | np.ndarray, predicted: list[str] | np.ndarray, classes: list[str]) -> np.ndarray:
    """Counts: rows = true class, columns = predicted class, in `classes` order."""
    idx = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true, predicted):
        m[idx[str(t)], idx[str(p)]] += 1
    return m
