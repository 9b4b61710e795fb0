"""Translocation plates (Kensert et al. 2019, Fig 4; BBBC013/BBBC014) in the one runner, and the
screener's dose-response view.

The experiment is a config of `cellmorph run` (configs/translocation/*.toml): the plate's 16 crops per
well (`dataset.options = {crops_per_well = 16}`), the 4 highest doses "translocated" and the 4 lowest
"not translocated", the middle doses unlabelled (predicted, never trained on or scored); predefined
folds over Metadata_Fold (BBBC013: plate rows A-D vs E-H); a well's probability is the mean over its
crops (`evaluation.aggregate = "mean"`, the well level is the paper's per-image accuracy); replicates
are `seeds`; accuracy after chosen epochs (`finetune.eval_epochs`). `outputs = ["dose_response"]`
adds, from this module: wells.csv's dose-response fit (4-parameter logistic) and Z'-factor per dose
series (dose_response.json, dose_response.png) and the Fig-4-like plot of per-replicate accuracy
after each evaluated epoch (fig4.png).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.datasets.bbbc013 import NEGATIVE, POSITIVE
from cellmorph.reporting.doseresponse import fit_logistic4, logistic4, z_prime
from cellmorph.io import write_json
from cellmorph.data.store import cache_dir, open_prepared


def crops_store(name: str, data_dir: Path, crops_per_well: int) -> Path:
    """The folder of a prepared store of the plate's crops (the first `crops_per_well` of each well's
    16), prepared once into the cache (keyed by the files) and reused."""
    from cellmorph.data.catalog import load_dataset
    from cellmorph.io import write_npy, write_parquet
    from cellmorph.data.prepare import prepare_translocation
    from cellmorph.data.store import store_key

    table = load_dataset(name, data_dir)
    full = cache_dir() / "prepared" / f"{name}-{store_key(table, 0)}"
    if not (full / "prepared.json").is_file():
        prepare_translocation(name, data_dir, full)
    if crops_per_well >= 16:
        return full
    sub = full.parent / f"{full.name}-crops{crops_per_well}"
    if not (sub / "prepared.json").is_file():
        store = open_prepared(full, mmap=True)
        keep = np.flatnonzero(store.index["Metadata_Crop"].to_numpy() <= crops_per_well)
        write_npy(sub / "images.npy", np.ascontiguousarray(store.images[keep]))
        write_parquet(sub / "index.parquet", store.index.iloc[keep].reset_index(drop=True))
        recipe = json.loads((full / "prepared.json").read_text())
        write_json(sub / "prepared.json", {**recipe, "crops_per_well": crops_per_well})  # last: marks it complete
    return sub


def translocation_labels(labels: pd.Series) -> pd.Series:
    """The training label: translocated / not translocated; middle doses become unlabelled ("")."""
    lab = labels.astype(str)
    return lab.where(lab.isin([POSITIVE, NEGATIVE]), "")


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

    from cellmorph.io import atomic_path

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

    from cellmorph.io import atomic_path

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
