"""Compound bootstrap of a `lomo` run's novelty AUROC and false-flag rate (treatments): resample the
18 compounds with replacement (each drawn compound brings all its scored treatments, of every round),
2,000 times, seed 0; prints the point value and the 2.5-97.5 percentiles. An uncertainty check of
numbers already measured, not a way to choose between scores.

    python benchmarks/novelty_bootstrap.py runs/lomo-distance [more run folders]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def bootstrap(units: pd.DataFrame, reps: int = 2000, seed: int = 0) -> dict:
    """Point AUROC / false-flag rate and their compound-bootstrap 95% percentile intervals.

    >>> bootstrap(pd.read_csv("runs/lomo/novelty_treatments.csv"))["auroc"]  # softmax, seed 0
    0.703"""
    rng = np.random.default_rng(seed)
    by = {c: g for c, g in units.groupby("Metadata_Compound")}
    names = list(by)
    aucs, ffr = [], []
    for _ in range(reps):
        s = pd.concat([by[c] for c in rng.choice(names, len(names))])
        novel = (s["role"] == "novel").to_numpy()
        if novel.all() or not novel.any():
            continue
        aucs.append(roc_auc_score(novel, s["novelty"]))
        ffr.append(s.loc[~novel, "flagged"].mean())
    y = units["role"] == "novel"
    return {"auroc": round(float(roc_auc_score(y, units["novelty"])), 3), "auroc_95": [round(float(x), 3) for x in np.percentile(aucs, [2.5, 97.5])],
            "false_flag_rate": round(float(units.loc[~y, "flagged"].mean()), 4),
            "false_flag_95": [round(float(x), 3) for x in np.percentile(ffr, [2.5, 97.5])], "reps": len(aucs), "compounds": len(names)}


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        score = json.loads((Path(folder) / "metrics.json").read_text())["novelty"].get("score", "softmax")
        print(json.dumps({"run": folder, "score": score, **bootstrap(pd.read_csv(Path(folder) / "novelty_treatments.csv"))}))
