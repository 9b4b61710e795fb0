"""Plots and the HTML report of a run folder."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cellmorph.config import ExperimentConfig, dump_toml  # noqa: E402
from cellmorph.io import atomic_path, write_text  # noqa: E402
from cellmorph.metrics import confusion, image_predictions  # noqa: E402


def _panel(ax, m, classes, title):
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted MoA")
    ax.set_ylabel("true MoA")
    total = m.sum()
    ax.set_title(f"{title}: {m.trace()}/{total} correct")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if m[i, j] > m.max() / 2 else "black")


def write_confusion_png(path: Path, pred: pd.DataFrame, treatments: pd.DataFrame, classes: list[str], label: str, title: str) -> None:
    """Two confusion matrices side by side: treatments (aggregated) and images; images only when
    `treatments` is None (a table without compounds)."""
    if treatments is None:
        fig, ax = plt.subplots(1, 1, figsize=(7, 6), constrained_layout=True)
        _panel(ax, confusion(pred[label], image_predictions(pred), classes), classes, "images")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(13, 6), constrained_layout=True)
        _panel(axes[0], confusion(treatments[label], treatments["predicted"], classes), classes, "treatments")
        _panel(axes[1], confusion(pred[label], image_predictions(pred), classes), classes, "images")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(path: Path, metrics: dict, cfg: ExperimentConfig) -> None:
    p = metrics["protocol"]
    rows = [
        (f"treatment accuracy ({p})", f"{metrics[f'treatment_accuracy_{p}']:.1%} ({metrics['treatments_correct']}/{metrics['treatments_total']})")
    ] if f"treatment_accuracy_{p}" in metrics else []
    rows += [
        (f"image accuracy ({p})", f"{metrics[f'image_accuracy_{p}']:.1%} ({metrics['images_correct']}/{metrics['images_total']})"),
        ("folds", str(metrics["n_folds"])),
        ("model", f"{metrics['model']} (init {metrics['init']}, {metrics['mode']})"),
        ("seeds", ", ".join(map(str, metrics["seeds"]))),
    ]
    wrong = "".join(
        f"<li>{html.escape(w['compound'])} @ {w['concentration']}: true {html.escape(w['true'])}, predicted {html.escape(w['predicted'])}</li>"
        for w in metrics.get("misclassified_treatments", [])
    ) or ("<li>none</li>" if "misclassified_treatments" in metrics else "<li>no treatments in this dataset (no compounds)</li>")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:2px 12px}}pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>{html.escape(cfg.name)}</h1>
<p>{html.escape(metrics['protocol_description'])}. Aggregation: {html.escape(metrics['aggregation'])}.</p>
<table>{''.join(f'<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>' for k, v in rows)}</table>
<h2>Misclassified treatments</h2><ul>{wrong}</ul>
<img src="confusion.png" style="max-width:100%">
<h2>Config</h2><pre>{html.escape(dump_toml(cfg))}</pre></body></html>
"""
    write_text(path, body)
