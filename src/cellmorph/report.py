"""Plots and the HTML report of a run folder, read from a `Metrics` (never from metrics.json keys)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cellmorph.aggregate import aggregate
from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.io import atomic_path, write_text
from cellmorph.metrics import LEVELS, Metrics, confusion, labelled

_PLURAL = {"image": "images", "well": "wells", "treatment": "treatments"}


def _panel(ax, m, classes, title):
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: {m.trace()}/{m.sum()} correct")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if m[i, j] > m.max() / 2 else "black")


def write_confusion_png(path: Path, pred: pd.DataFrame, metrics: Metrics, label: str, title: str, how: str = "median") -> None:
    """One confusion matrix per scored level, most aggregated first (e.g. treatments, then images).
    The units are built as compute_metrics builds them: labelled rows only, aggregated with `how`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = labelled(pred, label)
    levels = [lv for lv in reversed(LEVELS) if lv in metrics.levels]
    classes = metrics.classes + sorted(set(scored[label]) - set(metrics.classes))
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels) + 0.5, 6), squeeze=False, constrained_layout=True)
    for ax, lv in zip(axes[0], levels):
        units = aggregate(scored, lv, label, how)
        _panel(ax, confusion(units[label], units["predicted"], classes), classes, _PLURAL[lv])
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def _pm(sp: dict, key: str, pct: bool = True) -> str:
    sem = sp[f"{key}_sem"]
    return _fmt(sp[f"{key}_mean"], pct) + ("" if sem is None else f" ± {_fmt(sem, pct)}")


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _unit(w: dict) -> str:
    where = " ".join(f"{k} {w[k]}" for k in w if k not in ("true", "predicted"))
    return f"{where}: true {w['true']}, predicted {w['predicted']}"


def _profiles_section(folder: Path) -> str:
    """NSC, NSCB and mAP with the profile plot, when `cellmorph profiles evaluate` wrote them here."""
    import json

    f = folder / "profile_metrics.json"
    if not f.is_file():
        return ""
    m = json.loads(f.read_text())
    cells = [[k.upper() if k != "map" else "mAP (copairs)",
              f"{m[k]['correct']}/{m[k]['total']}" if k != "map" else f"{m[k].get('queries')} queries",
              _fmt(m[k].get("accuracy")) if k != "map" else _fmt(m[k].get("mean"), pct=False), m[k]["protocol"]] for k in ("nsc", "nscb", "map")]
    c = m["counts"]
    plot = '<img src="profiles.png" style="max-width:100%">' if (folder / "profiles.png").is_file() else ""
    return (f"<h2>Profiles (MoA retrieval)</h2><p>{html.escape(m['recipe'])}; {c['treatments']} treatments, {c['moas']} MoAs, "
            f"{c['compounds']} compounds.</p>" + _table(["metric", "count", "value", "protocol"], cells) + plot)


def write_report(path: Path, metrics: Metrics, cfg: ExperimentConfig) -> None:
    """report.html: scores per level, per-class scores and misclassified units of the headline level,
    spread over seeds, excluded groups, the confusion matrices and the config."""
    # plots of the config's extra outputs (outputs.py), written into the run folder before the report
    extra = "".join(f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img src="{html.escape(p.name)}" style="max-width:100%">'
                    for p in sorted(Path(path).parent.glob("*.png")) if p.name not in ("confusion.png", "profiles.png"))
    extra += _profiles_section(Path(path).parent)
    m, ctx, head = metrics, metrics.context, metrics.headline_level
    several = len(m.seeds) > 1 and bool(m.spread)
    levels = [lv for lv in reversed(LEVELS) if lv in m.levels]
    rows = []
    for lv in levels:
        s = m.levels[lv]
        row = [_PLURAL[lv], f"{s.correct}/{s.total}", _fmt(s.accuracy), _fmt(s.balanced_accuracy), _fmt(s.macro_f1, pct=False)]
        if several:
            sp = m.spread[lv]
            row += [_pm(sp, "accuracy"), _pm(sp, "balanced_accuracy"), _pm(sp, "macro_f1", pct=False)]
        rows.append(row)
    cols = ["level", "correct", "accuracy", "balanced accuracy", "macro-F1"]
    if several:
        cols[1] = f"correct (summed over {len(m.seeds)} seeds)"
        cols[2:5] = [f"{c} (mean over seeds)" for c in cols[2:5]]
        cols += ["accuracy, mean ± SEM", "balanced accuracy, mean ± SEM", "macro-F1, mean ± SEM"]
    scores = _table(cols, rows)
    per_class = _table(
        ["class", "support", "recall", "precision", "F1"],
        [[c, str(v["support"]), _fmt(v["recall"]), _fmt(v["precision"]), _fmt(v["f1"], pct=False)] for c, v in m.levels[head].per_class.items()],
    )
    about = [
        ("folds", str(ctx.get("n_folds", "?"))),
        ("model", f"{ctx.get('model', '?')} (init {ctx.get('init', '?')}, {ctx.get('mode', '?')})"),
        ("seeds", ", ".join(map(str, m.seeds)) or "?"),
    ]
    about_html = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in about)
    wrong = m.levels[head].misclassified
    wrong_html = "".join(f"<li>{html.escape(_unit(w))}</li>" for w in wrong) or "<li>none</li>"
    if head == "image":
        wrong_html = "<li>images are not listed one by one: see the confusion matrix</li>"
    excluded = "".join(f"<li>{html.escape(', '.join(f'{k}: {v}' for k, v in e.items()))}</li>" for e in m.excluded)
    excluded_html = f"<h2>Excluded (not scored)</h2><ul>{excluded}</ul>" if excluded else ""
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 12px;text-align:left}}pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>{html.escape(cfg.name)}</h1>
<p>{html.escape(m.protocol)}: {html.escape(m.protocol_description)}. Aggregation: {html.escape(str(ctx.get("aggregation", "none")))}.</p>
<table>{about_html}</table>
<h2>Scores per level</h2>{scores}
<h2>Per class ({html.escape(_PLURAL[head])})</h2>{per_class}
<h2>Misclassified {html.escape(_PLURAL[head])}</h2><ul>{wrong_html}</ul>
{excluded_html}
<img src="confusion.png" style="max-width:100%">{extra}
<h2>Config</h2><pre>{html.escape(dump_toml(cfg))}</pre></body></html>
"""
    write_text(path, body)
