"""What screeners read off a plate: a 4-parameter logistic dose-response fit (EC50) and the Z'-factor.

    response(x) = bottom + (top - bottom) / (1 + 10 ** ((x50 - x) * hill))

`x` is the position on a logarithmic dose axis: log10(concentration) when concentrations are known
(then EC50 = 10 ** x50), or the dose step of a dilution series (BBBC013's metadata gives only the dose
index 0-10; then x50 is a step, e.g. 5.3 = between the 5th and 6th dose).

Z' (Zhang, Chung & Oldenburg 1999) = 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg|, with sample standard
deviations (ddof = 1) over control wells: > 0.5 an excellent assay, 0-0.5 marginal, < 0 unusable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.io import atomic_path, write_json


def logistic4(x, bottom: float, top: float, x50: float, hill: float):
    return bottom + (top - bottom) / (1.0 + 10.0 ** ((x50 - np.asarray(x, dtype=float)) * hill))


@dataclass
class Fit4PL:
    bottom: float
    top: float
    x50: float
    hill: float
    r2: float
    n: int
    converged: bool

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fit_logistic4(x, y) -> Fit4PL:
    """Least-squares 4PL fit of responses y at log-dose positions x (several y per x are fine)."""
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 4 or len(np.unique(x)) < 4:
        raise ValueError("a 4-parameter fit needs at least 4 distinct doses")
    span = float(x.max() - x.min()) or 1.0
    p0 = [float(y.min()), float(y.max()), float(np.median(x)), 4.0 / span]
    lo = [float(y.min()) - abs(np.ptp(y)) - 1e-9, float(y.min()) - abs(np.ptp(y)) - 1e-9, float(x.min()) - span, -50.0]
    hi = [float(y.max()) + abs(np.ptp(y)) + 1e-9, float(y.max()) + abs(np.ptp(y)) + 1e-9, float(x.max()) + span, 50.0]
    try:
        p, _ = curve_fit(logistic4, x, y, p0=p0, bounds=(lo, hi), maxfev=20000)
        converged = True
    except (RuntimeError, ValueError):
        p, converged = np.array(p0), False
    resid = y - logistic4(x, *p)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return Fit4PL(float(p[0]), float(p[1]), float(p[2]), float(p[3]), r2, len(x), converged)


def z_prime(positive, negative) -> float:
    """Z'-factor between positive and negative control readouts (e.g. per-well translocation probabilities)."""
    pos = np.asarray(positive, dtype=float)
    neg = np.asarray(negative, dtype=float)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError("Z' needs at least 2 positive and 2 negative control wells")
    gap = abs(pos.mean() - neg.mean())
    if gap == 0:
        return float("-inf")
    return float(1.0 - 3.0 * (pos.std(ddof=1) + neg.std(ddof=1)) / gap)


def write_dose_response(out: Path, wells: pd.DataFrame, curve: list[dict], dataset: str, setting: str, epochs: list[int]) -> dict:
    """dose_response.json/.png from the mean P(translocated) per well over the seeds, and fig4.png from the
    per-seed well accuracy after each evaluated epoch."""
    dose = dose_response(wells)
    write_json(out / "dose_response.json", dose)
    plot_dose_response(out / "dose_response.png", wells, dose, f"{dataset}: {setting}, mean over replicates")
    if curve:
        acc = pd.DataFrame([{"setting": setting, "epoch": c["epoch"], "image_accuracy": c["well"]} for c in curve if "epoch" in c and "well" in c])
        if len(acc):
            plot_fig4(out / "fig4.png", acc, sorted(acc["epoch"].unique()), dataset)
    return dose


def dose_response(wells: pd.DataFrame) -> dict:
    """4PL fit per dose series on the dose axis (BBBC013: dose step; BBBC014: log10 molar), Z' between the controls."""
    out = {"series": {}}
    group = "Metadata_CellLine" if "Metadata_CellLine" in wells.columns else "Metadata_Compound"
    log_conc = "Metadata_CellLine" in wells.columns and wells["Metadata_Concentration"].max() < 1  # molar from the plate map
    for name, g in wells.groupby(group):
        x = np.log10(g["Metadata_Concentration"]) if log_conc else g["Metadata_Dose"].astype(float)
        try:
            fit = fit_logistic4(x, g["p_translocated"]).as_dict()
        except ValueError as err:
            fit = {"error": str(err)}
        if log_conc and "x50" in fit:
            fit["ec50_molar"] = float(10 ** fit["x50"])
        pos = g.loc[g["Metadata_Control"] == "positive", "p_translocated"]
        neg = g.loc[g["Metadata_Control"] == "negative", "p_translocated"]
        zp = z_prime(pos, neg) if len(pos) >= 2 and len(neg) >= 2 else None
        out["series"][str(name)] = {"fit_4pl": fit, "x_axis": "log10 molar" if log_conc else "dose step (SBS_Doses)", "z_prime": zp,
                                    "n_wells": int(len(g)), "n_pos_controls": int(len(pos)), "n_neg_controls": int(len(neg))}
    pos = wells.loc[wells["Metadata_Control"] == "positive", "p_translocated"]
    neg = wells.loc[wells["Metadata_Control"] == "negative", "p_translocated"]
    # Pooled over both halves: each half is scored by a different model (trained on the other half), whose
    # probabilities need not share a scale, so this is lower than the per-series Z' that a screener reads.
    out["z_prime_all_controls"] = z_prime(pos, neg) if len(pos) >= 2 and len(neg) >= 2 else None
    out["n_wells"] = int(len(wells))
    return out


def plot_fig4(path: Path, acc: pd.DataFrame, epochs, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(acc["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, setting in zip(axes[0], settings):
        data = [acc[(acc.setting == setting) & (acc.epoch == e)]["image_accuracy"].to_numpy() for e in epochs]
        ax.boxplot(data, positions=range(len(epochs)), widths=0.5, showfliers=False)
        for i, d in enumerate(data):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_xlabel("epochs")
        n = len(data[0])
        ax.set_title(f"{setting} ({n} replicates)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("per-image test accuracy")
    fig.suptitle(f"{dataset}: translocation, 2-fold CV over wells")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_dose_response(path: Path, wells: pd.DataFrame, dose: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = "Metadata_CellLine" if "Metadata_CellLine" in wells.columns else "Metadata_Compound"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (name, g), color in zip(wells.groupby(group), ("tab:blue", "tab:orange", "tab:green")):
        info = dose["series"][str(name)]
        log_conc = info["x_axis"] == "log10 molar"
        x = np.log10(g["Metadata_Concentration"]) if log_conc else g["Metadata_Dose"].astype(float)
        ax.scatter(x, g["p_translocated"], s=14, color=color, alpha=0.7, label=f"{name} (Z' {info['z_prime']:.2f})" if info["z_prime"] is not None else str(name))
        fit = info["fit_4pl"]
        if "x50" in fit:
            xs = np.linspace(x.min(), x.max(), 200)
            ax.plot(xs, logistic4(xs, fit["bottom"], fit["top"], fit["x50"], fit["hill"]), color=color)
            if x.min() <= fit["x50"] <= x.max():
                ax.axvline(fit["x50"], color=color, ls=":", lw=1)
    ax.set_xlabel(info["x_axis"])
    ax.set_ylabel("predicted P(translocated), per well")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
