"""Compare run folders: final accuracies as mean +- SEM over replicate seeds, and
accuracy-vs-epoch curves (pretrained vs scratch, like Kensert et al.'s Fig 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.io import atomic_path, check_writable, write_text


def _sem(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def load_runs(runs: list[Path]) -> list[dict]:
    out = []
    for r in runs:
        f = Path(r) / "metrics.json"
        if not f.is_file():
            raise CellmorphError(f"{f}: not found. Is {r} a finished run folder? (Rerun `cellmorph run` with --out {r} to finish it.)")
        out.append(json.loads(f.read_text()) | {"run": str(r)})
    return out


def summarize_runs(runs: list[Path], out: Path) -> pd.DataFrame:
    check_writable(out)
    ms = load_runs(runs)
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for m in ms:
        groups.setdefault((m["experiment"], m["model"], m["init"], m["protocol"]), []).append(m)
    for (name, model, init, protocol), g in groups.items():
        t = np.array([m[f"treatment_accuracy_{protocol}"] for m in g])
        i = np.array([m[f"image_accuracy_{protocol}"] for m in g])
        rows.append(
            {
                "experiment": name,
                "model": model,
                "init": init,
                "protocol": protocol,
                "seeds": ",".join(str(s) for m in g for s in m["seeds"]),
                "treatments": " ".join(f"{m['treatments_correct']}/{m['treatments_total']}" for m in g),
                "treatment_acc_mean": round(float(t.mean()), 4),
                "treatment_acc_sem": round(_sem(t), 4),
                "image_acc_mean": round(float(i.mean()), 4),
                "image_acc_sem": round(_sem(i), 4),
                "excluded": "; ".join(e["compound"] for e in g[0].get("excluded_compounds", [])),
            }
        )
    table = pd.DataFrame(rows).sort_values(["protocol", "experiment"]).reset_index(drop=True)
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(out / "summary.md", _markdown(table))
    _plot_curves(groups, out / "curves.png")
    return table


def _pm(mean: float, sem: float) -> str:
    return f"{mean:.1%}" + (" (one seed)" if np.isnan(sem) else f" ± {sem:.1%}")


def _markdown(t: pd.DataFrame) -> str:
    head = "| experiment | model | init | protocol | seeds | treatments correct | treatment acc (mean ± SEM) | image acc (mean ± SEM) |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.experiment} | {r.model} | {r.init} | {r.protocol} | {r.seeds} | {r.treatments} | "
        f"{_pm(r.treatment_acc_mean, r.treatment_acc_sem)} | {_pm(r.image_acc_mean, r.image_acc_sem)} |\n"
        for r in t.itertuples()
    )
    return head + body


def _plot_curves(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curved = {k: g for k, g in groups.items() if all("curve" in m for m in g)}
    if not curved:
        return
    protocols = sorted({k[3] for k in curved})
    fig, axes = plt.subplots(2, len(protocols), figsize=(6.5 * len(protocols), 8), squeeze=False, constrained_layout=True)
    for col, protocol in enumerate(protocols):
        for (name, model, init, p), g in sorted(curved.items()):
            if p != protocol:
                continue
            for row, level in enumerate(("treatment", "image")):
                key = f"{level}_accuracy_{protocol}"
                acc = np.array([[c[key] for c in m["curve"]] for m in g])
                epochs = np.arange(1, acc.shape[1] + 1)
                mean = acc.mean(0)
                sem = acc.std(0, ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else np.zeros_like(mean)
                ax = axes[row, col]
                style = "-" if init == "imagenet" else "--"
                ax.errorbar(epochs, mean, yerr=sem, fmt=style, marker="o", ms=3, capsize=2, label=f"{model} ({init}, n={len(acc)})")
                ax.set_title(f"{level} accuracy, {protocol.upper()}")
                ax.set_xlabel("epoch")
                ax.set_ylabel("accuracy (mean ± SEM over seeds)")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
