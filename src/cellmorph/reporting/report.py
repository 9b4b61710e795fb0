"""Plots and the HTML report of a run folder, read from a `Metrics` (never from metrics.json keys):
confusion matrices, the conformal reliability and coverage plots, the lomo novelty plot."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.evaluation.aggregate import aggregate
from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.io import atomic_path, write_text
from cellmorph.data.table import labelled_rows
from cellmorph.data.table import ImageTable
from cellmorph.evaluation.metrics import LEVELS, Metrics, confusion
from cellmorph.reporting.sections import (CURVES_PNG, confusion_rates_html, examples_html, group_spread_html, inner_choice_html, roc_auc, tune_html,
                                          wall_time_text)

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

    scored = labelled_rows(pred, label)
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


_OWN_PNGS = {"confusion.png", "reliability.png", "coverage.png", "novelty.png", "profiles.png", CURVES_PNG}  # placed by the report itself


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_conformal_pngs(out: Path, metrics: Metrics, title: str) -> None:
    """reliability.png (per level: accuracy vs confidence of the plain softmax, per confidence bin,
    with the ECE) and coverage.png (empirical vs nominal coverage, and mean set size, per level), from
    metrics.conformal. Nothing is written when the block has no level."""
    block = metrics.conformal
    levels = [lv for lv in reversed(LEVELS) if lv in block.get("levels", {})]
    if not levels:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 4.2), squeeze=False, constrained_layout=True)
    for ax, lv in zip(axes[0], levels):
        s = block["levels"][lv]
        rel = s["reliability"]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
        ax.bar([r["lo"] for r in rel], [r["accuracy"] for r in rel], width=[r["hi"] - r["lo"] for r in rel], align="edge",
               alpha=0.6, edgecolor="k", label="accuracy in bin")
        ax.plot([r["confidence"] for r in rel], [r["accuracy"] for r in rel], "o", color="C3", ms=4, label="(mean confidence, accuracy)")
        for r in rel:
            ax.text((r["lo"] + r["hi"]) / 2, 0.02, str(r["n"]), ha="center", fontsize=7)
        scaled = s.get("reliability_scaled")
        if scaled:
            ax.plot([r["confidence"] for r in scaled], [r["accuracy"] for r in scaled], "s-", color="C2", ms=3, lw=1, label="temperature-scaled")
        after = f" ({s['ece_scaled']:.3f} scaled)" if s.get("ece_scaled") is not None else ""
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="top-class probability (softmax, aggregated)", ylabel="fraction correct",
               title=f"{_PLURAL[lv]}: ECE {s['ece']:.3f}{after}")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}\nreliability (numbers: units per bin)", fontsize=9)
    _save(fig, Path(out) / "reliability.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    confs = [float(c) for c in block["levels"][levels[0]]["by_confidence"]]
    a1.plot([0.75, 1], [0.75, 1], color="grey", lw=1, ls="--", label="nominal")
    for k, lv in enumerate(levels):
        by = block["levels"][lv]["by_confidence"]
        cov = [by[f"{c:g}"]["coverage"] for c in confs]
        sem = [by[f"{c:g}"].get("coverage_sem") or 0 for c in confs]
        a1.errorbar(confs, cov, yerr=sem, marker="o", capsize=3, color=f"C{k}", label=f"{_PLURAL[lv]} ({block['levels'][lv]['n_units']})")
        a2.plot(confs, [by[f"{c:g}"]["mean_set_size"] for c in confs], marker="o", color=f"C{k}", label=_PLURAL[lv])
    a1.set(xlabel="nominal confidence", ylabel="empirical coverage", title=f"coverage, leave-one-{block.get('group', '?')}-out", xlim=(0.75, 1), ylim=(0.7, 1.01))
    a2.axhline(1, color="grey", lw=1, ls="--")
    a2.set(xlabel="nominal confidence", ylabel="mean prediction-set size", title="set size (0 = flagged as none of the classes)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, Path(out) / "coverage.png")


def write_novelty_png(path: Path, folder: Path, metrics: Metrics, title: str) -> None:
    """lomo: ROC curves of the novelty score (novel vs known held-out units) per novel MoA, and the
    novelty scores of both kinds with the flag threshold 0.9; the headline level's units, read from
    `folder`/novelty_<level>s.csv."""
    from sklearn.metrics import roc_curve

    lv = metrics.headline_level
    units_path = Path(folder) / f"novelty_{lv}s.csv"
    if not units_path.is_file():
        return
    units = pd.read_csv(units_path)
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    per = metrics.novelty.get("per_moa", {})
    for k, (m, g) in enumerate(units.groupby("novel_moa", sort=True)):
        fpr, tpr, _ = roc_curve(g["role"] == "novel", g["novelty"])
        auc = per.get(m, {}).get(lv, {}).get("auroc")
        a1.plot(fpr, tpr, color=f"C{k}", label=f"{m} ({auc:.2f})" if auc is not None else m)
        nov, kn = g[g["role"] == "novel"], g[g["role"] != "novel"]
        a2.scatter(nov["novelty"], np.full(len(nov), k + 0.15) + np.random.default_rng(k).uniform(-0.08, 0.08, len(nov)), color="C3", s=12)
        a2.scatter(kn["novelty"], np.full(len(kn), k - 0.15) + np.random.default_rng(k).uniform(-0.08, 0.08, len(kn)), color="C0", s=8, alpha=0.5)
    a1.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    a1.set(xlabel="false-flag rate (known held-out)", ylabel="novel units flagged", title=f"ROC of the novelty score, {_PLURAL[lv]} (AUROC)")
    a1.legend(fontsize=7, loc="lower right")
    names = sorted(units["novel_moa"].unique())
    a2.axvline(0.9, color="k", lw=1, ls="--")
    a2.set_yticks(range(len(names)), names, fontsize=8)
    score = {"distance": "1 - distance p-value", "combined": "max(1 - max p-value, 1 - distance p-value)"}.get(
        metrics.novelty.get("score", "softmax"), "1 - max p-value")
    a2.set(xlabel=f"novelty = {score} (flagged at >= 0.9, dashed)", title="red: novel MoA's units; blue: known held-out units")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _conformal_html(m: Metrics) -> str:
    block = m.conformal
    if not block:
        return ""
    if not block.get("levels"):
        why = "; ".join(f"{k}: {v}" for k, v in block.get("skipped", {}).items())
        return f"<h2>Conformal prediction sets</h2><p>Not computed: {html.escape(why)}.</p>"
    rows = []
    for lv in reversed(LEVELS):
        s = block["levels"].get(lv)
        if not s:
            continue
        for c, b in s["by_confidence"].items():
            sem = b.get("coverage_sem")
            rows.append([_PLURAL[lv], c, _fmt(b["coverage"]) + ("" if sem is None else f" ± {_fmt(sem)}") + f" ({b['covered']}/{b['total']})",
                         f"{b['mean_set_size']:.2f}", str(b["empty"]), f"{s['ece']:.3f}",
                         "–" if s.get("ece_scaled") is None else f"{s['ece_scaled']:.3f}", ", ".join(s["methods"])])
    per_class = ""
    head = next(lv for lv in reversed(LEVELS) if lv in block["levels"])
    b9 = block["levels"][head]["by_confidence"].get("0.9", {})
    if b9.get("per_class"):  # per seed only (a multi-seed block keeps the pooled numbers)
        per_class = (f"<p>Coverage at 0.9 per true class ({html.escape(_PLURAL[head])}; the guarantee is marginal where calibration is pooled):</p>"
                     + _table(["class", "covered"], [[c, f"{v['covered']}/{v['total']} ({_fmt(v['coverage'])})"] for c, v in b9["per_class"].items()]))
    seeds = f", mean ± SEM over {len(m.seeds)} seeds (counts summed)" if len(m.seeds) > 1 else ""
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in block.get("skipped", {}).items())
    return (f"<h2>Conformal prediction sets</h2><p>{html.escape(block['evaluation'])}{html.escape(seeds)}. Score: {html.escape(block['nonconformity'])}; "
            f"p-values {html.escape(block['p_values'])} ({html.escape(block['library'])}). An empty set = flagged as none of the classes. "
            f"ECE: expected calibration error of the plain softmax (10 bins); scaled: after temperature scaling, each group's units "
            f"tempered with the temperature fitted on the other groups' (the sets use the plain softmax).</p>"
            + _table(["level", "confidence", "coverage", "mean set size", "empty sets", "ECE", "ECE scaled", "calibration"], rows)
            + per_class + (f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else "")
            + '<img src="coverage.png" style="max-width:100%"><img src="reliability.png" style="max-width:100%">')


def _novelty_html(m: Metrics) -> str:
    block = m.novelty
    if not block:
        return ""
    rows = []
    lvs = [lv for lv in reversed(LEVELS) if lv in block.get("overall", {})]
    for lv in lvs:
        for name, r in [*((mo, d[lv]) for mo, d in block["per_moa"].items() if lv in d), ("overall (pooled)", block["overall"][lv])]:
            rows.append([_PLURAL[lv], name, _fmt(r["novel_flag_rate"]) + f" ({r['novel_flagged']}/{r['novel_units']})",
                         _fmt(r["false_flag_rate"]) + f" ({r['known_flagged']}/{r['known_units']})", _fmt(r["known_coverage"]),
                         _fmt(r["auroc"], pct=False)])
    head = lvs[0] if lvs else None
    mean_auc = block["overall"][head].get("auroc_mean_over_moas") if head else None
    return (f"<h2>Novel mechanisms (leave-one-MoA-out)</h2><p>Score: {html.escape(block.get('score', 'softmax'))} "
            f"(evaluation.novelty_score). Flag: {html.escape(block['flag_rule'])}. Novelty score: "
            f"{html.escape(block['novelty_score'])}. Calibration: {html.escape(block['calibration'])}. "
            f"Mean of the per-MoA AUROCs ({html.escape(_PLURAL[head]) if head else ''}): {_fmt(mean_auc, pct=False)}.</p>"
            + _table(["level", "novel MoA", "novel units flagged at 0.9", "known held-out flagged (false flags)",
                      "known held-out coverage at 0.9", "novelty AUROC"], rows)
            + '<img src="novelty.png" style="max-width:100%">')


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
    names = {"nsc": "NSC", "nscb": "NSCB (all treatments)", "nscb_multi_batch": "NSCB (MoAs in >1 batch, as published)", "map": "mAP (copairs)"}
    cells = [[names[k],
              f"{m[k]['correct']}/{m[k]['total']}" if k != "map" else f"{m[k].get('queries')} queries",
              _fmt(m[k].get("accuracy")) if k != "map" else _fmt(m[k].get("mean"), pct=False), m[k]["protocol"]] for k in names if k in m]
    c = m["counts"]
    plot = '<img src="profiles.png" style="max-width:100%">' if (folder / "profiles.png").is_file() else ""
    return (f"<h2>Profiles (MoA retrieval)</h2><p>{html.escape(m['recipe'])}; {c['treatments']} treatments, {c['moas']} MoAs, "
            f"{c['compounds']} compounds.</p>" + _table(["metric", "count", "value", "protocol"], cells) + plot)


def config_text(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML without the section the run's mode does not use ([finetune] in a frozen run,
    [frozen] in a fine-tuned one)."""
    unused = "frozen" if cfg.mode == "finetune" else "finetune"
    out, skip = [], False
    for line in dump_toml(cfg).splitlines():
        if line.startswith("["):
            name = line.strip("[] ").split(".")[0]
            skip = name == unused
        if not skip:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def write_report(path: Path, metrics: Metrics, cfg: ExperimentConfig, pred: pd.DataFrame | None = None,
                 table: ImageTable | None = None) -> None:
    """report.html: scores per level (ROC AUC too for binary tasks), per-class scores, the row-normalised confusion
    matrix and the accuracy per group, example images per class and the most confident mistakes (from `pred`, the
    first seed's out-of-fold predictions, and `table`'s patch size), misclassified units of the headline level,
    spread over seeds, excluded groups, the confusion, training and conformal plots, wall time and the config.
    Sections that do not apply to the run are left out."""
    # plots of the config's extra outputs (outputs.py), written into the run folder before the report
    extra = "".join(f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img src="{html.escape(p.name)}" style="max-width:100%">'
                    for p in sorted(Path(path).parent.glob("*.png")) if p.name not in _OWN_PNGS)
    extra += _profiles_section(Path(path).parent)
    m, ctx, head = metrics, metrics.context, metrics.headline_level
    several = len(m.seeds) > 1 and bool(m.spread)
    levels = [lv for lv in reversed(LEVELS) if lv in m.levels]
    label, how = cfg.dataset.label, cfg.evaluation.aggregate
    usable = pred is not None and label in pred.columns
    aucs = roc_auc(pred, label, levels, m.classes, how) if usable else {}
    rows = []
    for lv in levels:
        s = m.levels[lv]
        row = [_PLURAL[lv], f"{s.correct}/{s.total}", _fmt(s.accuracy), _fmt(s.balanced_accuracy), _fmt(s.macro_f1, pct=False)]
        if aucs:
            row.append(_fmt(aucs.get(lv), pct=False))
        if several:
            sp = m.spread[lv]
            row += [_pm(sp, "accuracy"), _pm(sp, "balanced_accuracy"), _pm(sp, "macro_f1", pct=False)]
        rows.append(row)
    cols = ["level", "correct", "accuracy", "balanced accuracy", "macro-F1"]
    if aucs:
        cols.append(f"ROC AUC ({m.classes[1]} vs {m.classes[0]}, first seed)")
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
    wall = wall_time_text(Path(path).parent, ctx)
    if wall:
        about.append(("wall time", wall))
    about_html = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in about)
    wrong = m.levels[head].misclassified
    wrong_html = "".join(f"<li>{html.escape(_unit(w))}</li>" for w in wrong) or "<li>none</li>"
    if head == "image":
        wrong_html = "<li>images are not listed one by one: see the confusion matrix</li>"
    excluded = "".join(f"<li>{html.escape(', '.join(f'{k}: {v}' for k, v in e.items()))}</li>" for e in m.excluded)
    excluded_html = f"<h2>Excluded (not scored)</h2><ul>{excluded}</ul>" if excluded else ""
    confusion_img = '<img src="confusion.png" style="max-width:100%">' if (Path(path).parent / "confusion.png").is_file() else ""
    rates = confusion_rates_html(pred, label, head, list(m.classes), how) if usable and not m.novelty else ""
    groups = group_spread_html(pred, label) if usable else ""
    patch = table.patch_size if table is not None else int((cfg.dataset.options or {}).get("patch_size", 0) or 0)
    examples = examples_html(pred, label, table, patch, cfg.dataset.image_size) if usable and not m.novelty else ""
    curves = (f'<h2 id="training">Fine-tuning curves</h2><p>Per fold: training loss and accuracy per epoch (folds/NN/history.json); '
              f'black: held-out accuracy where the run measured it.</p><img src="{CURVES_PNG}" style="max-width:100%">'
              if cfg.mode == "finetune" and (Path(path).parent / CURVES_PNG).is_file() else "")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 12px;text-align:left}}pre{{background:#f4f4f4;padding:1em}}
figure{{display:inline-block;margin:2px 4px;vertical-align:top;font-size:11px;max-width:150px}}figure img{{width:64px;height:64px;image-rendering:pixelated}}
table.rates td{{text-align:right;min-width:3em}}div.mistakes figure{{width:150px}}</style></head>
<body><h1>{html.escape(cfg.name)}</h1>
<p>{html.escape(m.protocol)}: {html.escape(m.protocol_description)}. Aggregation: {html.escape(str(ctx.get("aggregation", "none")))}.</p>
<table>{about_html}</table>
<h2>Scores per level</h2>{scores}
<h2>Per class ({html.escape(_PLURAL[head])})</h2>{per_class}
{rates}{groups}{tune_html(ctx)}{inner_choice_html(ctx)}
<h2>Misclassified {html.escape(_PLURAL[head])}</h2><ul>{wrong_html}</ul>
{examples}
{excluded_html}
{confusion_img}{curves}{_conformal_html(m)}{_novelty_html(m)}{extra}
<h2>Config</h2><pre>{html.escape(config_text(cfg))}</pre></body></html>
"""
    write_text(path, body)
