"""report.html of `cellmorph predict`: one self-contained page (thumbnails embedded as base64 PNG).

Per unit of the most aggregated level the input has (treatment, else well, else image): its keys, the
prediction and its probability, the conformal prediction set at the chosen confidence, the novelty
score and the "none of the known classes" flag, and 3 thumbnails: the unit's images most typical of
its prediction (highest probability of the predicted class). Flagged units are listed first.

Example:
    >>> write_predict_report(Path("runs/plate7/report.html"), result)
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.reporting.thumbnails import thumbnail

THUMBS = 3
THUMB_PX = 96
MAX_ROWS = 300  # an image-level report lists at most this many units (the parquet holds all)
_PLURAL = {"image": "images", "well": "wells", "treatment": "treatments"}


def _keys(level: str, units: pd.DataFrame) -> list[str]:
    if level == "treatment":
        return ["Metadata_Compound", "Metadata_Concentration"]
    if level == "well":
        return [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration") if c in units.columns]
    return [c for c in units.columns if c.startswith("Metadata_")][:4]


def _members(images: pd.DataFrame, units: pd.DataFrame, level: str, keys: list[str]) -> list[np.ndarray]:
    """Row indices (into `images`) of each unit's images."""
    if level == "image":
        return [np.array([i]) for i in range(len(units))]
    groups = images.groupby(keys, sort=False, dropna=False).indices
    return [groups.get(tuple(r) if len(keys) > 1 else r[0], np.array([], int)) for r in units[keys].itertuples(index=False)]


def write_predict_report(path: Path, result) -> None:
    """Write report.html for a `predict.PlatePrediction` (`result.pixels` gives the thumbnails' images)."""
    level = next(lv for lv in ("treatment", "well", "image") if result.level(lv) is not None)
    units, images = result.level(level), result.images
    keys = _keys(level, units)
    members = _members(images, units, level, keys)
    calibrated = "prediction_set" in units.columns
    order = np.arange(len(units))
    if calibrated:  # flagged first, then the largest sets, then the keys' order
        order = np.lexsort((np.arange(len(units)), -units["set_size"].to_numpy(), ~units["none_of_known"].to_numpy()))
    shown = order[:MAX_ROWS]
    label = result.label if result.label in units.columns else None
    qc_column = "qc_flags" in images.columns and bool((images["qc_flags"] != "").any())  # a column only when some image failed QC
    head = [*(k.removeprefix("Metadata_") for k in keys), "images" if level != "image" else None, f"known {label.removeprefix('Metadata_')}" if label else None,
            "prediction", "probability", *(["prediction set", "novelty", "none of the known"] if calibrated else []),
            *(["distance p-value", "flagged by"] if "flagged_by" in units.columns and "distance_pvalue" in units.columns else []),
            *(["QC" if level == "image" else "QC-flagged images"] if qc_column else []), "thumbnails"]
    head = [h for h in head if h is not None]
    best_of = {}
    for i in shown:  # each unit's images most typical of its prediction, decoded again from their files (all at once)
        idx, pred_col = members[i], f"prob_{units.iloc[i]['predicted']}"
        best_of[i] = idx[np.argsort(-images[pred_col].to_numpy()[idx], kind="stable")][:THUMBS] if len(idx) else idx
    pixels = result.pixels(np.concatenate([b for b in best_of.values()] or [np.array([], int)]))
    rows = []
    for i in shown:
        u = units.iloc[i]
        idx, best = members[i], best_of[i]
        thumbs = "".join(f'<img src="{thumbnail(pixels[j])}" title="{html.escape(_title(images.iloc[j]))}">' for j in best if j in pixels)
        cells = [html.escape(_fmt(u[k])) for k in keys]
        if level != "image":
            cells.append(str(len(idx)))
        if label:
            cells.append(html.escape(_fmt(u[label])))
        scaled = f" (calibrated {u['calibrated_probability']:.2f})" if "calibrated_probability" in units.columns else ""
        cells += [f"<b>{html.escape(str(u['predicted']))}</b>", f"{u['probability']:.2f}{scaled}"]
        if calibrated:
            cells += [html.escape(u["prediction_set"]) or "<i>empty</i>", f"{u['novelty']:.2f}", "<b>yes</b>" if u["none_of_known"] else "no"]
        if "flagged_by" in units.columns and "distance_pvalue" in units.columns:
            cells += [f"{u['distance_pvalue']:.3f}", html.escape(u["flagged_by"]) or "-"]
        if qc_column:
            bad = [images["qc_flags"].iat[j] for j in idx if images["qc_flags"].iat[j]]
            cells.append(html.escape(bad[0]) if level == "image" and bad else ("ok" if level == "image" else str(len(bad))))
        cells.append(thumbs)
        flag = ' class="novel"' if "none_of_known" in units.columns and u["none_of_known"] else ""
        rows.append(f"<tr{flag}>" + "".join(f"<td>{c}</td>" for c in cells[:-1]) + f'<td class="thumbs">{cells[-1]}</td></tr>')
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
    more = f"<p>The first {MAX_ROWS} of {len(units)} {_PLURAL[level]} are listed; predictions.parquet holds them all.</p>" if len(units) > MAX_ROWS else ""
    info = result.info
    summary = _summary(result, level, units, calibrated)
    cal = result.calibration.get(level, {})
    cal_text = cal.get("none") or (f"{cal.get('method')}, {cal.get('n_units')} calibration {_PLURAL[level]} "
                                   f"(out-of-fold predictions of the run, {cal.get('library')}); nonconformity {cal.get('nonconformity')}")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>cellmorph predict</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:3px 10px;text-align:left;vertical-align:middle;border-bottom:1px solid #ddd}}
tr.novel{{background:#fff1d6}}td.thumbs{{white-space:nowrap}}img{{margin-right:3px;width:{THUMB_PX}px;height:{THUMB_PX}px;image-rendering:auto}}</style></head>
<body><h1>Predictions: {html.escape(str(info.get('input', '')))}</h1>
<p>Model {html.escape(str(info.get('model', '')))} ({html.escape(str(info.get('architecture', '')))}, {html.escape(str(info.get('mode', '')))}{', mean over the 8 dihedral views of each image' if info.get('tta') else ''}),
{info.get('images', len(images))} images; {html.escape(str(info.get('aggregate', 'median')))} of image probabilities per well, then per treatment.</p>
{summary}
<p>Calibration ({_PLURAL[level]}): {html.escape(str(cal_text))}.</p>
{table}{more}</body></html>
"""
    from cellmorph.io import write_text

    write_text(path, body)


def _summary(result, level: str, units: pd.DataFrame, calibrated: bool) -> str:
    counts = units["predicted"].value_counts()
    items = "".join(f"<li>{html.escape(str(k))}: {v}</li>" for k, v in counts.items())
    text = f"<h2>{len(units)} {_PLURAL[level]}</h2><ul>{items}</ul>"
    if calibrated:
        c = result.confidence
        text += (f"<p>At confidence {c:.2f}: mean prediction-set size {units['set_size'].mean():.2f}; "
                 f"<b>{int((units['set_size'] == 0).sum())}</b> {_PLURAL[level]} with an empty prediction set "
                 f"(every class's conformal p-value is at most {1 - c:.2f}).</p>")
    else:
        text += "<p><b>No conformal calibration</b>: " + html.escape(result.calibration.get(level, {}).get("none", "")) + ".</p>"
    if "qc_flags" in result.images.columns:
        qc = result.novelty.get("image", {}).get("qc", {})
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in qc.get("flagged", {}).items())
        rules = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in qc.get("flags", {}).items())
        text += (f"<p><abbr title=\"{html.escape(rules)}\">Image QC</abbr>: <b>{int((result.images['qc_flags'] != '').sum())}</b> of "
                 f"{len(result.images)} images flagged ({html.escape(counts)}; rules in predict.json).</p>")
    nov = result.novelty.get(level, {})
    if "flagged_by" in units.columns and nov.get("score") in ("distance", "combined"):
        by = units["flagged_by"].value_counts()
        text += (f"<p>Novelty score: <b>{html.escape(nov['score'])}</b> ({html.escape(str(result.info.get('none_of_known', '')))}); "
                 f"{int(units['none_of_known'].sum())} {_PLURAL[level]} flagged"
                 + "".join(f"; by {html.escape(k)}: {v}" for k, v in by.items() if k) + ".</p>")
    elif nov.get("distance"):
        text += f"<p>Novelty score: softmax only ({html.escape(str(nov['distance']))}).</p>"
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _title(row: pd.Series) -> str:
    return ", ".join(f"{k.removeprefix('Metadata_')} {row[k]}" for k in row.index if k.startswith("Metadata_"))[:200]
