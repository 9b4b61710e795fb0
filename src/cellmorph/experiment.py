"""The only place that walks the whole flow: config in, run folder out, one fold at a time, resumable.

Run folder layout:

    config.toml           the resolved config (every default written out)
    environment.json      versions, device, seed, git commit, start time
    folds/NN/             per fold: fold.json (held-out group, sizes), history.json (fine-tuning),
                          predictions.parquet (written last: its presence marks the fold done)
    predictions.parquet   one row per image: Metadata_*, fold, prob_<class>
    treatments.csv        one row per treatment: median probabilities, prediction
    metrics.json          accuracies with protocol, counts and seed
    confusion.png, report.html

Each file is written under a temporary name and renamed, so a killed run leaves whole folds only,
and a rerun with the same --out skips the folds already done.
"""

from __future__ import annotations

import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellmorph import __version__
from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.datasets import load_dataset
from cellmorph.errors import CellmorphError
from cellmorph.features import extract_features, logistic_head
from cellmorph.io import atomic_path, check_writable, write_json, write_npy, write_parquet, write_text
from cellmorph.aggregate import has_treatments
from cellmorph.metrics import compute_metrics
from cellmorph.models import check_model_config, create_model, default_input_size
from cellmorph.progress import console, make_progress
from cellmorph.splits import PROTOCOL_DESCRIPTIONS, PROTOCOLS, Fold, lcbo_excluded
from cellmorph.store import Store, build_store
from cellmorph.train import fit, make_input_spec, pick_device, predict_proba, resize_uint8_stack


def environment(cfg: ExperimentConfig, device: torch.device) -> dict:
    import numpy
    import sklearn
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):  # not a git checkout (e.g. an installed copy)
        commit = ""
    return {
        "cellmorph": __version__,
        "git_commit": commit or None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _claim_run_folder(out: Path, cfg: ExperimentConfig) -> None:
    resolved = dump_toml(cfg) + "\n"
    cfg_path = out / "config.toml"
    if cfg_path.is_file():
        if cfg_path.read_text() != resolved:
            raise CellmorphError(
                f"{out} holds a run of a different config ({cfg_path} differs). Resume it with the same config, "
                "or choose another --out."
            )
    else:
        write_text(cfg_path, resolved)
    for stray in out.rglob(".*.tmp-*"):  # left by a killed run mid-write; never a finished file
        stray.unlink(missing_ok=True)


def run_experiment(cfg: ExperimentConfig, out: str | Path, data_dir: str | Path | None = None) -> dict:
    """Run (or resume) the experiment into `out`; return the metrics."""
    out = Path(out)
    # Validate everything the user controls before writing anything.
    table = load_dataset(cfg.dataset.name, data_dir, label=cfg.dataset.label, **cfg.dataset.options)
    check_model_config(cfg.model.name, cfg.model.init)
    device = pick_device(cfg.device)
    check_writable(out)
    store = build_store(table, cfg.dataset.image_size)  # decodes every image: a bad file stops us here
    _claim_run_folder(out, cfg)
    write_json(out / "environment.json", environment(cfg, device))

    folds = PROTOCOLS[cfg.evaluation.protocol](store.index, cfg.dataset.label)
    if cfg.evaluation.max_folds:
        folds = folds[: cfg.evaluation.max_folds]
    classes = table.classes
    y = store.index[cfg.dataset.label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()

    t0 = time.perf_counter()
    todo = [i for i in range(len(folds)) if not (_fold_dir(out, i) / "predictions.parquet").is_file()]
    if len(todo) < len(folds):
        console.print(f"resuming {out}: {len(folds) - len(todo)} of {len(folds)} folds already done")
    features = images = None
    if todo and cfg.mode == "frozen":
        features = extract_features(store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, device)
    elif todo:
        # The whole uint8 store goes to the device once, resized once; folds index it there.
        size = cfg.model.input_size or default_input_size(cfg.model.name)
        images = resize_uint8_stack(torch.from_numpy(np.asarray(store.images)).to(device), size)
    with make_progress() as progress:
        task = progress.add_task(f"{cfg.evaluation.protocol} folds", total=len(folds), completed=len(folds) - len(todo))
        for i in todo:
            fold = folds[i]
            progress.update(task, description=f"fold {i + 1}/{len(folds)}: {fold.name}")
            seed = cfg.seed * 1000 + i
            if cfg.mode == "frozen":
                cw = None if cfg.frozen.class_weight == "none" else "balanced"
                probs, history = logistic_head(features, y, fold.train, fold.test, len(classes), cfg.frozen.C, cw, seed), None
            else:
                probs, history, epoch_probs, model = _finetune_fold(cfg, images, y, len(classes), fold, device, seed, progress)
                if epoch_probs is not None:
                    write_npy(_fold_dir(out, i) / "epoch_probs.npy", epoch_probs)
                if cfg.finetune.save_models:
                    with atomic_path(_fold_dir(out, i) / "model.pt") as tmp:
                        torch.save(model.state_dict(), tmp)
            _write_fold(out, i, fold, store, classes, probs, history)
            progress.advance(task)
    fold_seconds = time.perf_counter() - t0
    return _finish(out, cfg, folds, classes, store.index, fold_seconds)


def _fold_dir(out: Path, i: int) -> Path:
    return out / "folds" / f"{i:02d}"


def _finetune_fold(cfg: ExperimentConfig, images: torch.Tensor, y: np.ndarray, n_classes: int, fold: Fold, device, seed: int, progress):
    """Train a fresh model on the fold's training images (uint8, on the device) and score its test images."""
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, cfg.model.init, num_classes=n_classes, in_chans=images.shape[1], drop_rate=cfg.model.drop_rate)
    train_idx = torch.as_tensor(fold.train, device=images.device)
    spec = make_input_spec(model, cfg.model.input_size or default_input_size(cfg.model.name), cfg.finetune.normalize, images[train_idx])
    ft = cfg.finetune
    steps = ft.epochs * max(1, len(fold.train) // ft.batch_size)
    task = progress.add_task(f"  training on {len(fold.train)} images", total=steps)
    test_images = images[torch.as_tensor(fold.test, device=images.device)]
    epoch_probs = []
    on_epoch = (lambda epoch: epoch_probs.append(predict_proba(model, test_images, spec, device, batch_size=max(ft.batch_size, 64)))) if ft.eval_every_epoch else None
    hist = fit(model, images[train_idx], y[fold.train], n_classes, ft, spec, device, seed, on_step=lambda: progress.advance(task), on_epoch=on_epoch)
    progress.remove_task(task)
    probs = epoch_probs[-1] if epoch_probs else predict_proba(model, test_images, spec, device, batch_size=max(ft.batch_size, 64))
    return probs, hist.__dict__, (np.stack(epoch_probs).astype(np.float32) if epoch_probs else None), model


def _write_fold(out: Path, i: int, fold: Fold, store: Store, classes: list[str], probs: np.ndarray, history: dict | None) -> None:
    d = _fold_dir(out, i)
    write_json(d / "fold.json", {"index": i, "held_out": fold.name, "n_train": len(fold.train), "n_test": len(fold.test)})
    if history is not None:
        write_json(d / "history.json", history)
    pred = store.index.iloc[fold.test][[c for c in store.index.columns if c.startswith("Metadata_")]].copy()
    pred.insert(0, "fold", i)
    pred.insert(1, "fold_held_out", fold.name)
    for j, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, j]
    write_parquet(d / "predictions.parquet", pred)  # last: marks the fold done


def _finish(out: Path, cfg: ExperimentConfig, folds: list[Fold], classes: list[str], index: pd.DataFrame, fold_seconds: float) -> dict:
    from cellmorph.aggregate import to_treatments
    from cellmorph.report import write_confusion_png, write_report

    pred = pd.concat([pd.read_parquet(_fold_dir(out, i) / "predictions.parquet") for i in range(len(folds))], ignore_index=True)
    write_parquet(out / "predictions.parquet", pred)
    label = cfg.dataset.label
    protocol = cfg.evaluation.protocol
    metrics = {
        "experiment": cfg.name,
        "protocol": protocol,
        "protocol_description": PROTOCOL_DESCRIPTIONS[protocol],
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "init": cfg.model.init,
        "mode": cfg.mode,
        "seeds": [cfg.seed],
        "n_folds": len(folds),
        "classes": classes,
        **compute_metrics(pred, protocol, label),
        **({"excluded_compounds": lcbo_excluded(index, label)} if protocol == "lcbo" else {}),
        **({"curve": _epoch_curve(out, folds, pred, classes, protocol, label)} if (_fold_dir(out, 0) / "epoch_probs.npy").is_file() else {}),
        "aggregation": "median over fields of a well, then median over replicate wells; argmax",
        "seconds_in_folds_this_invocation": round(fold_seconds, 2),
    }
    treat = None
    if has_treatments(pred):
        treat = to_treatments(pred, label)
        write_text(out / "treatments.csv", treat.to_csv(index=False))
    else:  # e.g. nucleus patches: no compounds, one prediction per row is the unit scored
        metrics["aggregation"] = "none: one prediction per row (no compounds to aggregate over)"
    write_confusion_png(out / "confusion.png", pred, treat, classes, label, title=f"{cfg.name}: {cfg.model.name} ({cfg.mode}), {protocol}")
    write_report(out / "report.html", metrics, cfg)
    write_json(out / "metrics.json", metrics)
    return metrics


def _epoch_curve(out: Path, folds: list[Fold], pred: pd.DataFrame, classes: list[str], protocol: str, label: str) -> list[dict]:
    """Test accuracy after each epoch (every fold scored after every epoch), for Fig-3-style curves."""
    per_fold = [np.load(_fold_dir(out, i) / "epoch_probs.npy") for i in range(len(folds))]
    curve = []
    for e in range(per_fold[0].shape[0]):
        p = pred.copy()
        p[[f"prob_{c}" for c in classes]] = np.concatenate([f[e] for f in per_fold])
        m = compute_metrics(p, protocol, label)
        keys = (f"treatment_accuracy_{protocol}", f"image_accuracy_{protocol}")
        curve.append({"epoch": e + 1, **{k: m[k] for k in keys if k in m}})
    return curve
