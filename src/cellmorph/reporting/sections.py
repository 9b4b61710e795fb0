"""The parts of a run's report.html that read the predictions and the run folder (report.py writes the page):
example images per class and the most confident mistakes (thumbnails decoded again from the image files named in
predictions.parquet), the row-normalised confusion matrix, the accuracy spread over groups (patients / slides,
plates, compounds, batches), ROC AUC of binary tasks, the fine-tuning curves (folds/NN/history.json) and the
wall time. Each returns "" when it does not apply, so the report leaves the section out.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cellmorph.data.store import open_store
from cellmorph.data.stream import field_batches
from cellmorph.data.table import PATH_PREFIX, ImageTable, labelled_rows
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.aggregate import aggregate
from cellmorph.io import atomic_path
from cellmorph.reporting.thumbnails import thumbnail

EXAMPLES_PER_CLASS = 3
MISTAKES = 8
THUMB_PX = 64  # report size: at most (classes x 3 + 8) thumbnails of about 4-10 kB each
GROUP_COLUMNS = {"Metadata_Image": "slide / patient image", "Metadata_Plate": "plate", "Metadata_Compound": "compound",
                 "Metadata_Batch": "batch (week)"}
PLURAL = {"image": "images", "well": "wells", "treatment": "treatments"}
CURVES_PNG = "training_curves.png"


def _scored(pred: pd.DataFrame, label: str) -> pd.DataFrame:
    s = labelled_rows(pred, label).reset_index(drop=True)
    probs = [c for c in s.columns if c.startswith("prob_")]
    classes = [c.removeprefix("prob_") for c in probs]
    p = s[probs].to_numpy()
    s["predicted"] = [classes[i] for i in p.argmax(axis=1)]
    s["probability"] = p.max(axis=1)
    return s


def _pixels(rows: pd.DataFrame, label: str, table: ImageTable | None, patch: int, image_size: int) -> tuple[dict[int, np.ndarray], str]:
    """The uint8 images of `rows` (by their position in `rows`), as the run's store gives them: through `table` (the
    run's dataset: its rows found by their Metadata_* values, a prepared store's crops included), else decoded from
    the files predictions.parquet names; ({}, why) when they cannot be read (no files named, files moved)."""
    if not len(rows):
        return {}, ""
    try:
        if table is not None:
            keys = [c for c in rows.columns if c.startswith("Metadata_") and c in table.df.columns]
            index = table.df[keys].reset_index(names="_row")
            found = rows[keys].reset_index(drop=True).reset_index(names="_pos").merge(index, on=keys, how="left")
            if keys and len(found) == len(rows) and found["_row"].notna().all() and not found.duplicated("_pos").any():
                pos = dict(zip(found["_row"].astype(int), found["_pos"]))
                store = open_store(table, image_size)
                return {int(pos[r]): im for chunk, batch in store.batches(16, np.array(sorted(pos))) for r, im in zip(chunk, batch)}, ""
        paths = [c for c in rows.columns if c.startswith(PATH_PREFIX)]
        if not paths:
            return {}, "predictions.parquet names no image files"
        t = ImageTable(rows.reset_index(drop=True), name="report", label=label, required=(), patch_size=patch)
        return {int(r): im for chunk, batch in field_batches(t, image_size, np.arange(len(rows)), 16) for r, im in zip(chunk, batch)}, ""
    except (CellmorphError, OSError, ValueError) as err:
        return {}, f"the images could not be read again ({err})"


def _where(row: pd.Series) -> str:
    keys = [c for c in row.index if c.startswith("Metadata_") and c not in ("Metadata_Center_X", "Metadata_Center_Y")]
    path = next((str(row[c]) for c in row.index if c.startswith(PATH_PREFIX)), "")
    def value(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k.removeprefix('Metadata_')} {value(row[k])}" for k in keys[:5]) + (f" — {Path(path).name}" if path else "")


def examples_html(pred: pd.DataFrame, label: str, table: ImageTable | None, patch_size: int, image_size: int) -> str:
    """Per class, the EXAMPLES_PER_CLASS images it was most confidently and correctly called on; then the MISTAKES
    images called wrong with the highest probability (out-of-fold, first seed), each with its file and metadata."""
    s = _scored(pred, label)
    if not len(s):
        return ""
    right = s[s["predicted"] == s[label]].sort_values("probability", ascending=False, kind="stable")
    wrong = s[s["predicted"] != s[label]].sort_values("probability", ascending=False, kind="stable").head(MISTAKES)
    picks = {c: right[right[label] == c].head(EXAMPLES_PER_CLASS) for c in sorted(s[label].unique())}
    chosen = pd.concat([*picks.values(), wrong])
    pixels, why = _pixels(chosen, label, table, patch_size, image_size)
    pos = {idx: k for k, idx in enumerate(chosen.index)}  # row of `s` -> position in `chosen` (a row may be both)

    def figure(i, r, caption):
        im = pixels.get(pos[i])
        img = f'<img src="{thumbnail(im, THUMB_PX)}" alt="{html.escape(_where(r))}">' if im is not None else ""
        return f'<figure title="{html.escape(_where(r))}">{img}<figcaption>{caption}</figcaption></figure>'

    rows = []
    for c, g in picks.items():
        figs = "".join(figure(i, r, f"p = {r['probability']:.2f}") for i, r in g.iterrows()) or "<i>no image of this class was called right</i>"
        rows.append(f"<tr><td>{html.escape(c)}</td><td class='thumbs'>{figs}</td></tr>")
    mistakes = "".join(figure(i, r, f"true <b>{html.escape(str(r[label]))}</b><br>called <b>{html.escape(r['predicted'])}</b>, "
                                     f"p = {r['probability']:.2f}<br><small>{html.escape(_where(r))}</small>") for i, r in wrong.iterrows())
    note = f"<p><i>No thumbnails: {html.escape(why)}.</i></p>" if why else ""
    return (f"<h2 id='examples'>Example images per class</h2><p>The {EXAMPLES_PER_CLASS} images of each class called right with the "
            "highest probability (out-of-fold: each scored by a model that never saw its group).</p>" + note
            + f"<table class='examples'>{''.join(rows)}</table>"
            + f"<h2 id='mistakes'>Most confident mistakes</h2><p>The {len(wrong)} images called wrong with the highest probability "
            "(hover for the file).</p>" + (f"<div class='mistakes'>{mistakes}</div>" if len(wrong) else "<p>none</p>"))


def confusion_rates_html(pred: pd.DataFrame, label: str, level: str, classes: list[str], how: str = "median") -> str:
    """The confusion matrix of `level`, each row divided by its true class's count (recall on the diagonal)."""
    units = aggregate(labelled_rows(pred, label), level, label, how)
    classes = classes + sorted(set(units[label]) - set(classes))
    counts = pd.crosstab(pd.Categorical(units[label], classes), pd.Categorical(units["predicted"], classes), dropna=False).to_numpy()
    totals = counts.sum(axis=1, keepdims=True)
    rates = counts / np.where(totals > 0, totals, 1)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    body = []
    for i, c in enumerate(classes):
        cells = ("".join(f"<td style='background:rgba(31,119,180,{r:.2f});color:{'white' if r > 0.55 else 'black'}'>{r:.0%}</td>"
                         for r in rates[i]) if totals[i, 0] else "<td>–</td>" * len(classes))
        body.append(f"<tr><th>{html.escape(c)} ({int(totals[i, 0])})</th>{cells}</tr>")
    return (f"<h2 id='confusion-rates'>Confusion matrix, row-normalised ({PLURAL[level]})</h2><p>Each row: the true class "
            f"(its number of {PLURAL[level]}); each column: the predicted class; the fraction of the row.</p>"
            f"<table class='rates'><tr><th>true \\ predicted</th>{head}</tr>{''.join(body)}</table>")


def group_spread_html(pred: pd.DataFrame, label: str) -> str:
    """Image accuracy per group of each GROUP_COLUMNS column the data have (with at least 2 groups): how far the
    groups' accuracies spread (min, quartiles, max) and the weakest groups."""
    s = _scored(pred, label)
    rows = []
    for col, what in GROUP_COLUMNS.items():
        if col not in s.columns or s[col].nunique() < 2:
            continue
        acc = (s["predicted"] == s[label]).groupby(s[col].astype(str)).agg(["mean", "size"])
        q = np.quantile(acc["mean"], [0, 0.25, 0.5, 0.75, 1])
        worst = acc.sort_values("mean").head(3)
        rows.append([f"{what} ({col})", str(len(acc)), *(f"{x:.1%}" for x in q),
                     "; ".join(f"{k}: {v['mean']:.0%} of {int(v['size'])}" for k, v in worst.iterrows())])
    if not rows:
        return ""
    head = ["group", "groups", "min", "25%", "median", "75%", "max", "weakest groups (accuracy of images)"]
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<h2 id='groups'>Accuracy per group</h2><p>Image accuracy within each group (out-of-fold): a model that is right "
            f"on average can still fail one patient, plate or compound.</p><table><tr>{th}</tr>{body}</table>")


def inner_choice_html(context: dict) -> str:
    """frozen C or features = "auto": what each fold's inner split chose and every candidate's inner balanced accuracy
    (metrics.json's context.frozen_C_chosen), as a table with the chosen candidate in bold; "" for other runs."""
    chosen = context.get("frozen_C_chosen") or {}
    inner = [c for c in chosen.get("inner", []) if c]
    if not inner:
        return ""
    candidates = list(inner[0]["inner_balanced_accuracy"])
    shown = inner[:30]

    def pick(c: dict) -> str:  # runs recorded before choose_C named its choice: the C alone
        return c.get("chosen") or f"{c['C']:g}"

    th = "".join(f"<th>{html.escape(k)}</th>" for k in ["fold", *candidates])
    body = "".join("<tr><td>" + str(i + 1) + "</td>" + "".join(
        f"<td>{'<b>' if k == pick(c) else ''}{c['inner_balanced_accuracy'].get(k, float('nan')):.3f}{'</b>' if k == pick(c) else ''}</td>"
        for k in candidates) + "</tr>" for i, c in enumerate(shown))
    more = f"<p>(first {len(shown)} of {len(inner)} folds; all in metrics.json)</p>" if len(inner) > len(shown) else ""
    return (f"<h2 id='inner'>Recipe chosen inside each fold</h2><p>Every candidate's balanced accuracy on the fold's "
            f"{html.escape(inner[0].get('inner_split', 'inner split'))} of its training rows (bold: the one chosen, then refitted "
            f"on the whole training fold); the outer scores above never saw these choices.</p><table><tr>{th}</tr>{body}</table>{more}")


def tune_html(context: dict) -> str:
    """`cellmorph tune`: every candidate recipe's inner-split scores and wall time, the chosen one in bold
    (metrics.json's context.tune); "" for other runs."""
    rec = context.get("tune") or {}
    if not rec.get("candidates"):
        return ""

    def cells(r: dict) -> list[str]:
        inner = r.get("inner") or {}
        nums = [f"{inner[k]:.3f}" if inner.get(k) is not None else "–" for k in ("balanced_accuracy", "accuracy", "ece")]
        return [r["name"], *nums, f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "–",
                "chosen" if r.get("chosen") else r.get("status", "")]

    th = "".join(f"<th>{h}</th>" for h in ("candidate", "inner balanced accuracy", "inner accuracy", "inner ECE", "wall", ""))
    body = "".join("<tr>" + "".join(f"<td>{'<b>' if r.get('chosen') else ''}{html.escape(c)}{'</b>' if r.get('chosen') else ''}</td>"
                                    for c in cells(r)) + "</tr>" for r in rec["candidates"])
    return (f"<h2 id='tune'>Recipe chosen by nested validation</h2><p>Each candidate was scored on the inner split "
            f"({html.escape(rec.get('inner_split', ''))}); the best by {html.escape(rec.get('score', ''))} "
            f"(bold) was then run once on the outer split: the scores above are that run's, and the final model is trained "
            f"with it. Native image size {rec.get('native_px')} px; budget {rec.get('budget_min'):g} min, of which the "
            f"selection took {rec.get('seconds_selecting', 0) / 60:.1f} min. Recipes: metrics.json (context.tune).</p>"
            f"<table><tr>{th}</tr>{body}</table>")


def roc_auc(pred: pd.DataFrame, label: str, levels: list[str], classes: list[str], how: str = "median") -> dict[str, float]:
    """Binary tasks: ROC AUC of prob_<second class> at each level ({} for more than 2 classes, or one class present)."""
    if len(classes) != 2:
        return {}
    out = {}
    scored = labelled_rows(pred, label)
    for lv in levels:
        units = scored if lv == "image" else aggregate(scored, lv, label, how)
        y = (units[label].astype(str) == classes[1]).to_numpy()
        if y.all() or not y.any():
            continue
        out[lv] = float(roc_auc_score(y, units[f"prob_{classes[1]}"].to_numpy()))
    return out


def write_training_curves(folder: Path, run_dir: Path, curve: list[dict], title: str) -> bool:
    """training_curves.png from the folds' history.json (fine-tuning loss and training accuracy per epoch, one line
    per fold) and the held-out accuracy per epoch when the run measured it (metrics.curve). False when no fold has
    a history (frozen runs)."""
    files = sorted(Path(folder).glob("folds/[0-9][0-9]/history.json"))
    hists = []
    for f in files:
        try:
            h = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if h.get("epoch") and h.get("loss"):
            hists.append((f.parent.name, h))
    if not hists:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for k, (name, h) in enumerate(hists):
        a1.plot(h["epoch"], h["loss"], marker="o", ms=3, color=f"C{k % 10}", label=f"fold {name}")
        a2.plot(h["epoch"], h["train_accuracy"], marker="o", ms=3, color=f"C{k % 10}", alpha=0.6)
    test = [c for c in curve if "epoch" in c]
    if test:
        xs = [c["epoch"] for c in test]
        for lv in ("image", "well", "treatment"):
            if lv in test[0]:
                a2.plot(xs, [c[lv] for c in test], color="k", lw=2, ls="--" if lv != "image" else "-", label=f"held-out {PLURAL[lv]}")
    a1.set(xlabel="epoch", ylabel="training loss", title="fine-tuning loss per fold")
    a2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="training accuracy per fold (colour); held-out (black)")
    a1.legend(fontsize=7)
    if test:
        a2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    with atomic_path(Path(run_dir) / CURVES_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def wall_time_text(run_dir: Path, context: dict) -> str:
    """How long the run took: seconds in the folds (this invocation) and the time since environment.json's start."""
    parts = []
    if context.get("seconds_in_folds_this_invocation") is not None:
        parts.append(f"{_duration(context['seconds_in_folds_this_invocation'])} in the folds (this invocation)")
    try:
        started = json.loads((Path(run_dir) / "environment.json").read_text()).get("started")
        since = (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds()
        parts.append(f"{_duration(since)} from the start ({started}) to this report")
    except (OSError, ValueError, TypeError, json.JSONDecodeError):
        pass
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
