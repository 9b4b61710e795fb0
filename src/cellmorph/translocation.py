"""The paper's translocation experiment (Kensert et al. 2019, Fig 4) and the screener's dose-response view.

For each replicate r and each setting (ImageNet-pretrained vs from scratch), for each of the 2 folds of
independent wells (BBBC013: plate rows A-D vs E-H; BBBC014: one cell line out): fine-tune on the crops
of the labelled wells of the other half (4 highest doses "translocated", 4 lowest "not translocated"),
once up to the last epoch asked for, and after each epoch in `eval_epochs` predict every crop of the
held-out half (middle doses too). A well's (the paper's "image's") translocation probability is the mean
over its 16 crops; the per-image accuracy counts wells with probability >= 0.5 on the right side, over the
labelled wells of both folds. Middle-dose and control wells feed the dose-response curve (4-parameter
logistic) and the Z'-factor.

Every replicate's result is written to `out/replicates/<setting>-<r>.json` as soon as it is done, so a
killed run resumes where it stopped (`run_translocation` skips finished replicates).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellmorph.config import AugmentConfig, FinetuneConfig
from cellmorph.datasets.bbbc013 import LABEL, NEGATIVE, POSITIVE
from cellmorph.doseresponse import fit_logistic4, logistic4, z_prime
from cellmorph.errors import CellmorphError
from cellmorph.io import check_writable, write_json, write_text
from cellmorph.splits import Fold, assert_no_leak
from cellmorph.store import Store, cache_dir, open_prepared

SETTINGS = {"pretrained": "imagenet", "scratch": "xavier"}


def prepared_store(name: str, data_dir: Path, folder: Path | None = None) -> Store:
    """The prepared translocation store: `folder` if given, else prepared once into the cache (keyed by the files)."""
    from cellmorph.datasets import load_dataset
    from cellmorph.prepare import prepare_translocation
    from cellmorph.store import store_key

    if folder is None:
        table = load_dataset(name, data_dir)
        folder = cache_dir() / "prepared" / f"{name}-{store_key(table, 0)}"
    if not (Path(folder) / "prepared.json").is_file():
        prepare_translocation(name, data_dir, Path(folder))
    return open_prepared(folder)


def labels_of(index: pd.DataFrame) -> np.ndarray:
    """1 translocated, 0 not, -1 middle dose (never trained on or scored)."""
    lab = index[LABEL].astype(str)
    return np.where(lab == POSITIVE, 1, np.where(lab == NEGATIVE, 0, -1))


def two_folds(index: pd.DataFrame) -> list[Fold]:
    """Train on the labelled crops of one half (Metadata_Fold), test on every crop of the other half."""
    y = labels_of(index)
    half = index["Metadata_Fold"].to_numpy()
    folds = []
    for k in sorted(set(half)):
        fold = Fold(name=f"half {k} held out", train=np.flatnonzero((half != k) & (y >= 0)), test=np.flatnonzero(half == k))
        assert_no_leak(index, fold, "Metadata_Well")
        assert_no_leak(index, fold, "Metadata_Fold")
        folds.append(fold)
    return folds


def well_probabilities(index: pd.DataFrame, rows: np.ndarray, p_translocated: np.ndarray) -> pd.DataFrame:
    """Mean crop probability per well (the paper's per-image prediction), with the well's metadata."""
    cols = [c for c in ("Metadata_Well", "Metadata_Row", "Metadata_Column", "Metadata_Dose", "Metadata_Concentration",
                        "Metadata_Control", "Metadata_Compound", "Metadata_CellLine", "Metadata_Fold", LABEL) if c in index.columns]
    df = index.iloc[rows][cols].copy()
    df["p"] = p_translocated
    return df.groupby(cols, as_index=False, sort=True)["p"].mean().rename(columns={"p": "p_translocated"})


def score(wells: pd.DataFrame) -> dict:
    lab = wells[wells[LABEL].isin([POSITIVE, NEGATIVE])]
    right = (lab["p_translocated"] >= 0.5) == (lab[LABEL] == POSITIVE)
    return {"image_accuracy": float(right.mean()), "images_correct": int(right.sum()), "images_total": int(len(lab))}


@dataclass
class Settings:
    model: str = "tf_efficientnet_lite0"
    input_size: int = 224
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    eval_epochs: tuple[int, ...] = (1, 5, 10, 20)
    crops_per_well: int = 16


_TEMPLATES: dict[tuple[str, str], torch.nn.Module] = {}


def fresh_model(name: str, setting: str, seed: int) -> torch.nn.Module:
    """A new 2-class model: ImageNet weights (loaded once, then copied) with a new head, or Xavier from scratch.

    The random parts (the head; all weights when scratch) are drawn from `seed`.
    """
    import copy

    from cellmorph.models import create_model, xavier_init_

    key = (name, setting)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = create_model(name, SETTINGS[setting], num_classes=2)
    model = copy.deepcopy(_TEMPLATES[key])
    torch.manual_seed(seed)
    if setting == "pretrained":
        model.reset_classifier(2)
    else:
        xavier_init_(model)
    return model


def run_replicate(store_images: torch.Tensor, index: pd.DataFrame, setting: str, replicate: int, s: Settings, device: torch.device, seed: int = 0) -> dict:
    """Both folds of one replicate in one setting; returns per-epoch well probabilities and accuracies."""
    from cellmorph.models import normalization
    from cellmorph.train import InputSpec, fit, predict_proba

    y = labels_of(index)
    ft = FinetuneConfig(epochs=max(s.eval_epochs), batch_size=s.batch_size, optimizer=s.optimizer, lr=s.lr, momentum=s.momentum,
                        schedule="constant", class_weights=True, normalize="imagenet", amp=True, augment=AugmentConfig())
    per_epoch: dict[int, list[pd.DataFrame]] = {e: [] for e in s.eval_epochs}
    t0 = time.perf_counter()
    for k, fold in enumerate(two_folds(index)):
        fold_seed = seed * 1_000_003 + replicate * 101 + k * 7 + (0 if setting == "pretrained" else 50)
        model = fresh_model(s.model, setting, fold_seed)
        mean, std = normalization(model)
        spec = InputSpec(size=s.input_size, mean=mean, std=std)  # ImageNet mean/std normalisation
        test_images = store_images[torch.as_tensor(fold.test, device=store_images.device)]

        def evaluate(epoch: int) -> None:
            if epoch in per_epoch:
                p = predict_proba(model, test_images, spec, device, batch_size=256)[:, 1]
                per_epoch[epoch].append(well_probabilities(index, fold.test, p))

        fit(model, store_images[torch.as_tensor(fold.train, device=store_images.device)], y[fold.train], 2, ft, spec, device, fold_seed, on_epoch=evaluate)
    out = {"setting": setting, "replicate": replicate, "seconds": round(time.perf_counter() - t0, 2), "epochs": {}}
    for e, parts in per_epoch.items():
        wells = pd.concat(parts, ignore_index=True)
        out["epochs"][str(e)] = {**score(wells), "wells": wells[["Metadata_Well", "p_translocated"]].round(6).values.tolist()}
    return out


def _claim(out: Path, recipe: dict) -> None:
    """A results folder holds one recipe: resuming with other settings would mix incomparable replicates."""
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    path = out / "recipe.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != recipe:
            diff = sorted(k for k in {**old.get("settings", {}), **recipe["settings"]} if old.get("settings", {}).get(k) != recipe["settings"].get(k))
            diff += [k for k in ("dataset", "seed") if old.get(k) != recipe.get(k)]
            raise CellmorphError(f"{out} holds replicates made with other settings ({', '.join(diff)} differ, see {path}). "
                                 "Resume with the same options, or choose another --out.")
    else:
        write_json(path, recipe)


def subset_crops(store: Store, crops_per_well: int) -> tuple[np.ndarray, pd.DataFrame]:
    keep = np.flatnonzero(store.index["Metadata_Crop"].to_numpy() <= crops_per_well)
    return keep, store.index.iloc[keep].reset_index(drop=True)


def run_translocation(
    out: Path,
    data_dir: Path,
    dataset: str = "bbbc013",
    replicates: int = 30,
    settings: Settings | None = None,
    which: tuple[str, ...] = ("pretrained", "scratch"),
    device: str = "auto",
    seed: int = 0,
    prepared: Path | None = None,
    log=print,
) -> dict:
    from cellmorph.train import pick_device

    s = settings or Settings()
    out = check_writable(out)
    dev = pick_device(device)
    _claim(out, {"dataset": dataset, "seed": seed, "settings": asdict(s)})
    store = prepared_store(dataset, data_dir, prepared)
    keep, index = subset_crops(store, s.crops_per_well)
    from cellmorph.train import resize_uint8_stack

    # Small (1,536 crops): moved to the device once and resized to the input size there once.
    images = resize_uint8_stack(torch.from_numpy(np.ascontiguousarray(store.images[keep])).to(dev), s.input_size)
    t_start = time.perf_counter()
    for setting in which:
        if setting not in SETTINGS:
            raise CellmorphError(f"unknown setting '{setting}'; choose from {list(SETTINGS)}.")
        for r in range(replicates):
            path = out / "replicates" / f"{setting}-{r:02d}.json"
            if path.is_file():
                continue
            res = run_replicate(images, index, setting, r, s, dev, seed)
            write_json(path, res)
            accs = ", ".join(f"e{e}: {v['image_accuracy']:.3f}" for e, v in res["epochs"].items())
            log(f"{setting} replicate {r + 1}/{replicates}: {accs} ({res['seconds']:.1f} s)")
    summary = summarize(out, index, s, which, replicates, dev, dataset, seed, time.perf_counter() - t_start)
    return summary


def summarize(out: Path, index: pd.DataFrame, s: Settings, which, replicates: int, dev, dataset: str, seed: int, seconds: float) -> dict:
    rows, wells = [], []
    for setting in which:
        for r in range(replicates):
            res = json.loads((out / "replicates" / f"{setting}-{r:02d}.json").read_text())
            for e, v in res["epochs"].items():
                rows.append({"setting": setting, "replicate": r, "epoch": int(e), "image_accuracy": v["image_accuracy"],
                             "images_correct": v["images_correct"], "images_total": v["images_total"], "seconds": res["seconds"]})
                wells += [{"setting": setting, "replicate": r, "epoch": int(e), "Metadata_Well": w, "p_translocated": p} for w, p in v["wells"]]
    acc = pd.DataFrame(rows)
    write_text(out / "replicates.csv", acc.to_csv(index=False))
    counts = {}
    for (setting, e), g in acc.groupby(["setting", "epoch"]):
        counts.setdefault(setting, {})[str(e)] = {
            "replicates_100pct": int((g["image_accuracy"] == 1.0).sum()),
            "replicates": int(len(g)),
            "mean_image_accuracy": round(float(g["image_accuracy"].mean()), 4),
            "min_image_accuracy": round(float(g["image_accuracy"].min()), 4),
        }
    well_meta = well_probabilities(index, np.arange(len(index)), np.zeros(len(index))).drop(columns="p_translocated")
    wdf = pd.DataFrame(wells)
    last = max(s.eval_epochs)
    view_setting = "pretrained" if "pretrained" in which else which[0]
    mean_wells = (wdf[(wdf.setting == view_setting) & (wdf.epoch == last)].groupby("Metadata_Well", as_index=False)["p_translocated"].mean()
                  .merge(well_meta, on="Metadata_Well"))
    write_text(out / "wells.csv", mean_wells.to_csv(index=False))
    dose = dose_response(mean_wells)
    import platform

    import timm

    summary = {
        "experiment": f"translocation-{dataset}",
        "protocol": "2-fold CV over independent wells (BBBC013: plate rows A-D vs E-H; BBBC014: cell line out); "
        "per-image accuracy = wells whose mean crop probability is on the right side of 0.5, over the labelled wells of both folds",
        "dataset": dataset,
        "model": s.model,
        "settings": {k: SETTINGS[k] for k in which},
        "training": {"input_size": s.input_size, "batch_size": s.batch_size, "optimizer": s.optimizer, "lr": s.lr, "momentum": s.momentum,
                     "class_weights": True, "augment": "dihedral, channel jitter, blur, noise (cellmorph defaults)",
                     "crops_per_well": s.crops_per_well, "eval_epochs": list(s.eval_epochs)},
        "replicates": replicates,
        "seed": seed,
        "counts": counts,
        "dose_response": {"setting": view_setting, "epoch": last, **dose},
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "seconds_this_invocation": round(seconds, 1),
    }
    write_json(out / "results.json", summary)
    plot_fig4(out / "fig4.png", acc, s.eval_epochs, dataset)
    plot_dose_response(out / "dose_response.png", mean_wells, dose, f"{dataset}: {view_setting}, epoch {last}, mean of {replicates} replicates")
    return summary


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
