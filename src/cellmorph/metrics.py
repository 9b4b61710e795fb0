"""Accuracy per protocol and level, with counts, and confusion matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellmorph.aggregate import has_treatments, prob_columns, to_treatments


def image_predictions(pred: pd.DataFrame) -> np.ndarray:
    probs = prob_columns(pred)
    return np.array([probs[i].removeprefix("prob_") for i in pred[probs].to_numpy().argmax(axis=1)])


def compute_metrics(pred: pd.DataFrame, protocol: str, label: str = "Metadata_MoA") -> dict:
    """`{treatment,image}_accuracy_<protocol>` with the counts they rest on.

    Without compounds (e.g. nucleus patches) there is no treatment level: only the per-row
    (`image_accuracy_<protocol>`: one row = one image or patch) and per-class accuracies."""
    img_pred = image_predictions(pred)
    img_true = pred[label].astype(str).to_numpy()
    i_correct = int((img_pred == img_true).sum())
    out = {}
    if has_treatments(pred):
        treat = to_treatments(pred, label)
        t_correct = int((treat["predicted"] == treat[label].astype(str)).sum())
        out.update(
            {
                f"treatment_accuracy_{protocol}": t_correct / len(treat),
                "treatments_correct": t_correct,
                "treatments_total": int(len(treat)),
            }
        )
    out.update(
        {
            f"image_accuracy_{protocol}": i_correct / len(pred),
            "images_correct": i_correct,
            "images_total": int(len(pred)),
            "per_class_accuracy": {c: float((img_pred[img_true == c] == c).mean()) for c in sorted(set(img_true))},
        }
    )
    if has_treatments(pred):
        out["misclassified_treatments"] = [
            {"compound": r.Metadata_Compound, "concentration": float(r.Metadata_Concentration), "true": r[label], "predicted": r.predicted}
            for _, r in treat.iterrows()
            if r["predicted"] != str(r[label])
        ]
    return out


def confusion(true: list[str] | np.ndarray, predicted: list[str] | np.ndarray, classes: list[str]) -> np.ndarray:
    """Counts: rows = true class, columns = predicted class, in `classes` order."""
    idx = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true, predicted):
        m[idx[str(t)], idx[str(p)]] += 1
    return m
