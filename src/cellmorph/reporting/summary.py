"""Compare run folders: final scores as mean ± SEM over replicate seeds, and accuracy-vs-epoch
(or -iteration) curves (pretrained vs scratch, like Kensert et al.'s Fig 3).

Runs are grouped by (experiment, model, init, protocol); seeds are pooled across run folders and
inside a folder (a multi-seed metrics.json). Every level scored by all runs of a group is reported,
so runs without treatments (nucleus patches) give image rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.io import atomic_path, write_text
from cellmorph.evaluation.stats import mean_sem
from cellmorph.evaluation.metrics import LEVELS, Metrics, combine_seeds
from cellmorph.storage import RUN, SUMMARY, writing

GROUP = ("experiment", "model", "init")


def _group_key(m: Metrics) -> tuple:
    return tuple(str(m.context.get(k, "?")) for k in GROUP) + (m.protocol,)


def summarize_runs(runs: list[Path], out: Path) -> pd.DataFrame:
    """summary.csv and summary.md (one row per group and level) and curves.png (when runs have curves), into `out`
    (claimed through cellmorph.storage: a folder holding a user's files is refused)."""
    groups: dict[tuple, list[Metrics]] = {}
    for r in runs:
        m = Metrics.read(Path(r) / "metrics.json")
        groups.setdefault(_group_key(m), []).append(m)
    rows = []
    for (name, model, init, protocol), g in groups.items():
        c = combine_seeds(g)
        seeds = c.per_seed or [c]
        for lv in reversed(LEVELS):
            if lv not in c.levels:
                continue
            sp = c.spread[lv]
            rows.append(
                {
                    "experiment": name,
                    "model": model,
                    "init": init,
                    "protocol": protocol,
                    "level": lv,
                    "seeds": ",".join(str(s) for s in c.seeds),
                    "n_seeds": sp["n_seeds"],
                    "correct": " ".join(f"{s.levels[lv].correct}/{s.levels[lv].total}" for s in seeds),
                    **{k: (np.nan if v is None else round(v, 4)) for k, v in sp.items() if k != "n_seeds"},
                    "excluded": "; ".join(str(e.get("compound", e)) for e in c.excluded),
                }
            )
    table = pd.DataFrame(rows).sort_values(["protocol", "experiment", "model", "init"], kind="stable").reset_index(drop=True)
    out = Path(out)
    with writing(out, RUN if (out / "dataset.json").is_file() else SUMMARY):  # a run folder may hold its own summary
        with atomic_path(out / "summary.csv") as tmp:
            table.to_csv(tmp, index=False)
        write_text(out / "summary.md", _markdown(table))
        _plot_curves(groups, out / "curves.png")
    return table


def _pm(mean: float, sem: float, pct: bool = True) -> str:
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
    return f(mean) + (" (one seed)" if np.isnan(sem) else f" ± {f(sem)}")


def _markdown(t: pd.DataFrame) -> str:
    head = (
        "| experiment | model | init | protocol | level | seeds | correct | accuracy (mean ± SEM) | balanced accuracy (mean ± SEM) | macro-F1 (mean ± SEM) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.experiment} | {r.model} | {r.init} | {r.protocol} | {r.level} | {r.seeds} | {r.correct} | "
        f"{_pm(r.accuracy_mean, r.accuracy_sem)} | {_pm(r.balanced_accuracy_mean, r.balanced_accuracy_sem)} | "
        f"{_pm(r.macro_f1_mean, r.macro_f1_sem, pct=False)} |\n"
        for r in t.itertuples()
    )
    return head + body


def _series(g: list[Metrics]) -> list[list[dict]]:
    """The curve points of each seed of a group, one list per seed (seeds in different folders kept apart)."""
    out = []
    for m in combine_seeds(g).per_seed or g:
        by_seed: dict = {}
        for p in m.curve:
            by_seed.setdefault(p.get("seed"), []).append(p)
        out += list(by_seed.values())
    return out


def _plot_curves(groups: dict[tuple, list[Metrics]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curved = {k: s for k, g in groups.items() if (s := _series(g))}
    if not curved:
        return
    protocols = sorted({k[3] for k in curved})
    levels = [lv for lv in reversed(LEVELS) if any(lv in p for s in curved.values() for pts in s for p in pts)]
    fig, axes = plt.subplots(len(levels), len(protocols), figsize=(6.5 * len(protocols), 4 * len(levels)), squeeze=False, constrained_layout=True)
    for col, protocol in enumerate(protocols):
        for (name, model, init, p), series in sorted(curved.items()):
            if p != protocol:
                continue
            xkey = "epoch" if any("epoch" in pt for pts in series for pt in pts) else "iteration"
            for row, lv in enumerate(levels):
                at: dict = {}
                for pts in series:
                    for pt in pts:
                        if lv in pt and pt.get(xkey) is not None and pt[lv] is not None:
                            at.setdefault(pt[xkey], []).append(pt[lv])
                if not at:
                    continue
                xs = sorted(at)
                mean = np.array([np.mean(at[x]) for x in xs])
                sem = np.array([mean_sem(at[x])[1] or 0.0 for x in xs])
                ax = axes[row, col]
                style = "-" if init == "imagenet" else "--"
                ax.errorbar(xs, mean, yerr=sem, fmt=style, marker="o", ms=3, capsize=2, label=f"{model} ({init}, n={len(series)})")
                ax.set_title(f"{lv} accuracy, {protocol.upper()}")
                ax.set_xlabel(xkey)
                ax.set_ylabel("accuracy (mean ± SEM over seeds)")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
        for row in range(len(levels)):
            if axes[row, col].has_data():
                axes[row, col].legend(fontsize=7, loc="lower right")
            else:  # e.g. no treatment curve for a protocol whose runs have no treatments
                axes[row, col].axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
