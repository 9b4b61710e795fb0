"""The one runner: every experiment (BBBC021 MoA, translocation plates, nuclei, the lab's LeNet) is a
config of it. Config in, folds of the chosen protocol, one model per fold and seed, predictions,
metrics and report out; resumable at fold granularity.

Run folder layout:

    config.toml           the resolved config (every default written out)
    dataset.json          the fingerprint of the data the folds were computed from
    environment.json      versions, device, seeds, git commit, start time
    folds/NN/             per fold: fold.json (held-out group, sizes), history.json (fine-tuning),
                          curve_probs.npy (test probabilities at each curve point, when asked),
                          predictions.parquet (written last: its presence marks the fold done)
    seeds/S/...           with several seeds: the same per seed (folds/, predictions.parquet, metrics.json)
    predictions.parquet   one row per image: Metadata_*, [seed], fold, prob_<class>
    metrics.json          cellmorph.evaluation.metrics.Metrics: accuracy, balanced accuracy, macro-F1 per level, and
                          `conformal`: leave-one-compound-out coverage and set size of conformal prediction
                          sets at 0.8/0.9/0.95 per level, ECE (cellmorph.evaluation.conformal.evaluate)
    model/                the final model (save_model = true): fitted on every labelled row with the folds'
                          recipe, a bundle (bundle.py) holding the out-of-fold predictions as calibration.parquet
                          for `cellmorph predict`; several seeds: the first seed's
    confusion.png, reliability.png, coverage.png, report.html, and the config's extra `outputs` (outputs.py)

Under the `lomo` protocol (leave-one-MoA-out, cellmorph.evaluation.novelty) the folds run in memory (no
resume: a few minutes of logistic heads), metrics.json gains `novelty` (flag rates and AUROC per
novel MoA), novelty_<level>s.csv list every scored unit, and novelty.png replaces confusion.png.

Each file is written under a temporary name and renamed, so a killed run leaves whole folds only,
and a rerun with the same --out skips the folds already done. `cross_validate` runs the same folds
in memory, writing nothing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph import __version__
from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.config import override as override_config
from cellmorph.data.table import ImageTable
from cellmorph.data.catalog import load_dataset
from cellmorph.errors import CellmorphError
from cellmorph.io import atomic_path, check_writable, no_space_is_an_error, write_json, write_npy, write_parquet, write_text
from cellmorph.evaluation.metrics import Metrics, available_levels, combine_seeds, compute_metrics
from cellmorph.models.names import check_model_config, default_input_size
from cellmorph.progress import console, make_progress
from cellmorph.evaluation.splits import Fold, labelled_mask, make_folds
from cellmorph.data.store import Store, build_store

# torch, timm and the training code are imported where a network is built or run: a frozen run whose
# features are cached (the quickstart's second run) never loads them.

# The files a run folder holds; only temporaries of these names are ever cleaned up (never a user's file).
RUN_FILES = ("config.toml", "dataset.json", "environment.json", "fold.json", "history.json", "curve_probs.npy", "predictions.parquet",
             "model.pt", "metrics.json", "treatments.csv", "wells.csv", "confusion.png", "report.html",
             "reliability.png", "coverage.png", "novelty.png", "novelty_treatments.csv", "novelty_wells.csv", "novelty_images.csv")


def environment(cfg: ExperimentConfig, device) -> dict:
    from importlib.metadata import version

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
        "torch": version("torch"),
        "timm": version("timm"),
        "numpy": np.__version__,
        "scikit-learn": version("scikit-learn"),
        "device": str(device),
        **_device_details(device),
        "seeds": cfg.seed_list,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _device_details(device) -> dict:
    """The GPU's name and torch's threads, when torch is loaded anyway (it is not on a cached frozen run)."""
    import sys

    if "torch" not in sys.modules:
        return {"device_name": platform.processor() or "cpu"}
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else platform.processor() or "cpu"
    return {"device_name": name, "torch_threads": torch.get_num_threads()}


@dataclass
class Plan:
    """Everything a run needs, validated before anything is written."""

    cfg: ExperimentConfig
    table: ImageTable
    folds: list[Fold]
    excluded: list[dict]
    description: str
    levels: list[str]
    device_setting: str
    classes: list[str] = field(default_factory=list)
    _device: object = None

    @property
    def device(self):
        """The torch device, resolved at first use ("auto" needs torch to ask for CUDA)."""
        if self._device is None:
            from cellmorph.models.train import pick_device

            self._device = pick_device(self.device_setting)
        return self._device


def plan_run(cfg: ExperimentConfig, data_dir: str | Path | None = None, table: ImageTable | None = None) -> Plan:
    """Validate the dataset, model, device, protocol, levels and outputs of `cfg` (cheap: no image decoded)."""
    from cellmorph.reporting.outputs import check_outputs

    if table is None:
        table = load_dataset(cfg.dataset.name, data_dir, label=cfg.dataset.label, **cfg.dataset.options)
    check_model_config(cfg.model.name, cfg.model.init)
    if cfg.device != "auto":  # an explicit device is checked now; "auto" is resolved when a network runs
        from cellmorph.models.train import pick_device

        pick_device(cfg.device)
    if cfg.evaluation.protocol == "lomo" and cfg.mode != "frozen":
        raise CellmorphError(
            "evaluation.protocol = 'lomo' needs mode = \"frozen\": its nested calibration fits about 730 models on the BBBC021 subset "
            "(1 + K + K(K-1)/2 per novel MoA with K known compounds), cheap as logistic heads on cached features but hundreds of fine-tunes. "
            "Set mode = \"frozen\", or use protocol loco for a fine-tuned model's conformal coverage."
        )
    folds, excluded, description = make_folds(table.df, table.label, cfg.evaluation)
    if cfg.evaluation.max_folds:
        folds = folds[: cfg.evaluation.max_folds]
    levels = available_levels(table.df, cfg.evaluation.levels)
    check_outputs(cfg.outputs, table)
    if cfg.execution.backend == "ray":
        from cellmorph.engine.ray_backend import check_ray

        check_ray(cfg.execution)
    return Plan(cfg, table, folds, excluded, description, levels, cfg.device, table.classes)


def run_experiment(cfg: ExperimentConfig, out: str | Path, data_dir: str | Path | None = None) -> Metrics:
    """Run (or resume) the experiment into the run folder `out`; return its metrics.

    Args:
        cfg: a validated config (`cellmorph.config.load_config`).
        out: the run folder; a rerun with the same folder resumes at the first missing fold.
        data_dir: the folder holding the datasets (default: $CELLMORPH_DATA).
    Returns:
        The run's `Metrics` (also written to out/metrics.json).

    Example:
        >>> from cellmorph.config import load_config
        >>> m = run_experiment(load_config("configs/quickstart.toml"), "runs/quickstart")
        >>> m.level("treatment").correct, m.level("treatment").total
        (55, 55)
    """
    out = Path(out)
    existed = out.exists()
    plan = plan_run(cfg, data_dir)
    check_writable(out)
    try:
        store = build_store(plan.table, cfg.dataset.image_size)  # decodes every image: a bad file stops us here
    except BaseException:
        _remove_if_empty(out, existed)
        raise
    _claim_run_folder(out, cfg, store)
    env = environment(cfg, plan.device_setting)
    write_json(out / "environment.json", env)
    t0 = time.perf_counter()
    engine = _Engine(plan, store)
    sinks = {seed: _FolderSink(out if len(cfg.seed_list) == 1 else out / "seeds" / str(seed)) for seed in cfg.seed_list}
    lomo = cfg.evaluation.protocol == "lomo"  # its heads run in memory, in this process (cellmorph.evaluation.novelty)
    if not lomo:
        engine.run_folds(sinks)  # every seed's missing folds: in this process, or as Ray tasks ([execution])
    if engine.execution:
        env = {**env, "execution": engine.execution}
        write_json(out / "environment.json", env)
    per_seed, preds = [], []
    for seed, sink in sinks.items():
        folder = sink.folder
        pred, m = engine.run_seed(seed, sink) if lomo else engine.collect(seed, sink)
        if len(cfg.seed_list) > 1:
            write_parquet(folder / "predictions.parquet", pred)
            m.write(folder / "metrics.json")
            pred = pred.assign(seed=seed)
        per_seed.append(m)
        preds.append(pred)
    metrics = combine_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
    metrics.context["seconds_in_folds_this_invocation"] = round(time.perf_counter() - t0, 2)
    if plan._device is not None:  # a network ran: record the device it ran on
        write_json(out / "environment.json", {**env, "device": str(plan._device), **_device_details(plan._device)})
    pred = pd.concat(preds, ignore_index=True)
    if cfg.save_model and lomo:  # its predictions are not leave-one-compound-out scores of one model's classes
        console.print("final model: not saved under the lomo protocol (run the same config with protocol loco to get one)")
    elif cfg.save_model:
        save_final_model(out / MODEL_DIR, cfg, plan, store, preds[0].drop(columns="seed", errors="ignore"))
    _finish(out, cfg, plan, pred, metrics)
    return metrics


MODEL_DIR = "model"


def save_final_model(path: Path, cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame) -> Path:
    """Fit the final model on every labelled row (the folds' recipe: frozen = cached features + logistic
    head, finetune = one more training) and save it as a bundle at `path` with the out-of-fold predictions
    `oof` (one seed's) as its calibration data. A bundle already there from the same data and seed is
    kept (a resumed run does not fit it again).

    Example:
        >>> save_final_model(Path("runs/quickstart/model"), cfg, plan, store, pred)
        PosixPath('runs/quickstart/model')
    """
    from cellmorph.models.bundle import META

    seed = cfg.seed_list[0]
    final_cfg = cfg if cfg.seed == seed else override_config(cfg, {"seed": seed})
    if (path / META).is_file():
        try:
            done = json.loads((path / META).read_text()).get("trained_on", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            done = {}
        if done.get("store_key") == store.key and done.get("seed") == seed and (path / "config.toml").is_file() \
                and (path / "config.toml").read_text() == dump_toml(final_cfg) + "\n":
            console.print(f"final model: {path} already fitted on this data (kept)")
            return path
    label = plan.table.label
    n = int(labelled_mask(plan.table.df, label).sum())
    if cfg.mode == "frozen" and _save_frozen_from_cache(path, final_cfg, plan, store, oof):
        return path
    from cellmorph.api import Classifier

    clf = Classifier(config=final_cfg)
    with make_progress() as progress:
        if cfg.mode == "finetune":
            steps = cfg.finetune.epochs * max(1, n // min(cfg.finetune.batch_size, n))
            task = progress.add_task(f"final model on all {n} labelled images", total=steps)
            clf._fit_store(plan.table, store, final_cfg, on_step=lambda: progress.advance(task))
        else:
            task = progress.add_task(f"final model on all {n} labelled images", total=1)
            clf._fit_store(plan.table, store, final_cfg)
            progress.advance(task)
    clf.calibration, clf.calibration_info = _calibration(cfg, plan, store, oof, seed)
    clf.reference = _reference(cfg, plan, store)
    return clf.save(path, overwrite=True)


def _calibration(cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame, seed: int) -> tuple[pd.DataFrame | None, dict | None]:
    """The final model's calibration data: the labelled out-of-fold predictions, and what they are."""
    label = plan.table.label
    if label not in oof.columns:
        return None, None
    info = {"what": "out-of-fold predictions of the cross-validation (each row scored by a fold model that never saw its group)",
            "protocol": cfg.evaluation.protocol, "folds": len(plan.folds), "seed": seed, "label": label,
            "aggregate": cfg.evaluation.aggregate, "store_key": store.key}
    return oof[labelled_mask(oof, label)].reset_index(drop=True), info


def _reference(cfg: ExperimentConfig, plan: Plan, store: Store, feats: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The reference profiles of the distance novelty score (novelty.reference_profiles) of a frozen final
    model: its labelled training rows' cached backbone features (numpy only). None for fine-tuned models
    (their pre-logit features are not what novelty.py measured) and when the features are not cached."""
    from cellmorph.models.features import cached_features
    from cellmorph.evaluation.novelty import reference_profiles

    if cfg.mode != "frozen" or "Metadata_Compound" not in plan.table.df.columns:
        return None
    feats = cached_features(store, cfg.model, cfg.frozen.tta) if feats is None else feats
    if feats is None:
        return None
    table = plan.table
    idx = np.flatnonzero(labelled_mask(table.df, table.label))
    return reference_profiles(feats[idx], table.df.iloc[idx], table.label, cfg.evaluation.aggregate)


def _save_frozen_from_cache(path: Path, cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame) -> bool:
    """A frozen final model from the cached features and the backbone weights cached beside them: the same
    bundle `Classifier.fit(...).save(...)` writes (the same head fit on the same features, the same weights),
    without importing torch or timm, so a warm frozen run stays fast. False when the weights are not cached
    (a random backbone, or features cached by an older cellmorph): the caller then fits through Classifier."""
    from cellmorph.models.bundle import bundle_meta, save_bundle
    from cellmorph.models.features import cached_backbone, cached_features, fit_logistic_head

    m, fz = cfg.model, cfg.frozen
    if m.init in ("random", "xavier", "gaussian"):
        return False
    feats, backbone = cached_features(store, m, fz.tta), cached_backbone(store, m, fz.tta)
    if feats is None or backbone is None:
        return False
    weights, spec = backbone
    table = plan.table
    idx = np.flatnonzero(labelled_mask(table.df, table.label))
    y = table.df[table.label].astype(str).map({c: i for i, c in enumerate(plan.classes)}).to_numpy()[idx].astype(np.int64)
    scaler, head = fit_logistic_head(feats[idx], y, fz.C, None if fz.class_weight == "none" else "balanced", cfg.seed)
    coef, intercept = head.coef_, head.intercept_
    if coef.shape[0] == 1:  # sklearn's binary head, as Classifier._fit_frozen stores it
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    arrays = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": coef, "intercept": intercept}
    tensors = {**{f"backbone.{k}": v for k, v in weights.items()}, **{f"head.{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}}
    images = store.images
    trained_on = {"dataset": table.name, "images": len(idx), "store_key": store.key, "seed": cfg.seed,
                  "image_shape": list(images.shape[2:]), "channel_columns": table.path_columns}
    calibration, info = _calibration(cfg, plan, store, oof, cfg.seed)
    meta = bundle_meta(cfg, plan.classes, images.shape[1], spec["size"], spec["mean"], spec["std"], spec["normalize"], trained_on,
                       info, len(calibration) if calibration is not None else 0)
    save_bundle(path, tensors, meta, cfg, overwrite=True, calibration=calibration, reference=_reference(cfg, plan, store, feats))
    console.print(f"final model: {path} (frozen head on all {len(idx)} labelled images, backbone weights from the feature cache)")
    return True


@dataclass
class CVResult:
    """What `cross_validate` returns: the metrics and one row of predictions per image (and seed)."""

    metrics: Metrics
    predictions: pd.DataFrame


def cross_validate_config(cfg: ExperimentConfig, table: ImageTable | None = None, data_dir: str | Path | None = None) -> CVResult:
    """The same folds, models and scores as `run_experiment`, in memory: nothing is written.

    Example:
        >>> res = cross_validate_config(load_config("configs/quickstart.toml"))
        >>> res.metrics.level("treatment").accuracy
        1.0
    """
    plan = plan_run(cfg, data_dir, table)
    store = build_store(plan.table, cfg.dataset.image_size)
    engine = _Engine(plan, store)
    per_seed, preds = [], []
    for seed in cfg.seed_list:
        pred, m = engine.run_seed(seed, _MemorySink())
        per_seed.append(m)
        preds.append(pred.assign(seed=seed) if len(cfg.seed_list) > 1 else pred)
    metrics = combine_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
    return CVResult(metrics, pd.concat(preds, ignore_index=True))


# --- the fold loop -----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    probs: np.ndarray  # n_test x n_classes
    history: dict | None = None
    curve_x: list[int] = field(default_factory=list)  # epochs or iterations of the curve points
    curve_unit: str = "epoch"
    curve_probs: np.ndarray | None = None  # points x n_test x n_classes


@contextmanager
def _torch_threads(n: int):
    """Run the block on `n` torch threads (0: leave torch's setting), then restore it."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Engine:
    """Runs the folds of one seed: frozen (cached features + logistic head) or fine-tuning."""

    def __init__(self, plan: Plan, store: Store):
        self.plan, self.store = plan, store
        cfg = plan.cfg
        label = plan.table.label
        # Labels and metadata come from the dataset's table (e.g. middle doses unlabelled there); the
        # store only holds the pixels, row for row.
        self.index = plan.table.df
        if len(store.images) != len(self.index):
            raise CellmorphError(f"the image store holds {len(store.images)} images but the dataset {len(self.index)} rows; rebuild it (delete the cache folder).")
        lab = labelled_mask(self.index, label)
        cls = {c: i for i, c in enumerate(plan.classes)}
        self.y = np.where(lab, self.index[label].astype(str).map(cls).fillna(-1).to_numpy(), -1).astype(np.int64)
        self.features = self.images = None
        self.cfg = cfg
        self.execution: dict = {}  # how the folds ran, when not in this process (environment.json)

    def _prepare(self) -> None:
        cfg = self.cfg
        if cfg.mode == "frozen" and self.features is None:
            from cellmorph.models.features import cached_features, extract_features

            self.features = cached_features(self.store, cfg.model, cfg.frozen.tta)
            if self.features is None:
                self.features = extract_features(self.store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, self.plan.device)
        elif cfg.mode == "finetune" and self.images is None:
            import torch

            from cellmorph.models.train import resize_uint8_stack

            # The whole uint8 store goes to the device once, resized once; folds index it there.
            size = cfg.model.input_size or default_input_size(cfg.model.name)
            self.images = resize_uint8_stack(torch.from_numpy(np.asarray(self.store.images)).to(self.plan.device), size)

    def run_seed(self, seed: int, sink) -> tuple[pd.DataFrame, Metrics]:
        if self.cfg.evaluation.protocol == "lomo":
            return self._run_lomo(seed, sink)
        self.run_folds({seed: sink}, local=True)
        return self.collect(seed, sink)

    def run_folds(self, sinks: dict, local: bool = False) -> None:
        """Compute every fold not yet in its seed's sink: one after another here (backend "local"), or as
        Ray tasks (backend "ray", cellmorph.engine.ray_backend) that write the same fold folders. A fold's numbers are
        a function of (config, store, fold, seed) and, fine-tuning on a CPU, the torch thread count
        (execution.threads): at the same count both backends give byte-identical predictions."""
        folds, many = self.plan.folds, len(self.cfg.seed_list) > 1
        jobs = []
        for seed, sink in sinks.items():
            todo = [i for i in range(len(folds)) if not sink.done(i)]
            if len(todo) < len(folds):
                console.print(f"resuming {sink.where}: {len(folds) - len(todo)} of {len(folds)} folds already done" + (f" (seed {seed})" if many else ""))
            jobs += [(seed, i, sink) for i in todo]
        total = len(folds) * len(sinks)
        ray = self.cfg.execution.backend == "ray" and not local
        if jobs and not ray:
            self._prepare()
        with make_progress() as progress:
            what = f"{self.cfg.evaluation.protocol} folds" + (f" x {len(sinks)} seeds" if many else "") + (" on Ray" if ray else "")
            task = progress.add_task(what, total=total, completed=total - len(jobs))
            if jobs and ray:
                from importlib.metadata import version

                from cellmorph.engine.ray_backend import run_on_ray

                ex = self.cfg.execution
                devices = run_on_ray(self, jobs, progress, task)
                self.execution = {"backend": "ray", "ray": version("ray"), "address": ex.address or "local cluster", "cpus_per_task": ex.cpus_per_task,
                                  "torch_threads": ex.threads or ex.cpus_per_task, "gpus_per_task": ex.gpus_per_task, "task_devices": devices, "tasks_this_invocation": len(jobs)}
                return
            with _torch_threads(self.cfg.execution.threads if self.cfg.mode == "finetune" else 0):
                self._run_here(jobs, progress, task)

    def _run_here(self, jobs: list, progress, task) -> None:
        folds, many = self.plan.folds, len(self.cfg.seed_list) > 1
        for seed, i, sink in jobs:
            fold = folds[i]
            progress.update(task, description=f"fold {i + 1}/{len(folds)}: {fold.name}" + (f", seed {seed}" if many else ""))
            res, model = self._fold(fold, seed * 1000 + i, progress)
            sink.save(i, fold, self._fold_predictions(i, fold, res.probs), res, model if self.cfg.finetune.save_models else None)
            progress.advance(task)

    def collect(self, seed: int, sink) -> tuple[pd.DataFrame, Metrics]:
        """The seed's predictions (fold by fold, in fold order) and metrics, from its sink."""
        folds = self.plan.folds
        pred = pd.concat([sink.predictions(i) for i in range(len(folds))], ignore_index=True)
        m = self._score(pred, seed, [sink.curve(i) for i in range(len(folds))])
        return pred, m

    def _run_lomo(self, seed: int, sink) -> tuple[pd.DataFrame, Metrics]:
        """Leave-one-MoA-out (cellmorph.evaluation.novelty): every head in memory, then the novelty block; the
        scored units go to novelty_<level>s.csv of a run folder."""
        from cellmorph.evaluation.novelty import lomo_levels, run_lomo

        cfg, plan = self.cfg, self.plan
        self._prepare()
        with make_progress() as progress:
            pred, block, units = run_lomo(self.features, self.y, self.index, plan.folds, plan.classes, plan.table.label, plan.levels,
                                          cfg.evaluation.aggregate, cfg.frozen.C, cfg.frozen.class_weight, seed, progress=progress,
                                          novelty_score=cfg.evaluation.novelty_score)
        if isinstance(sink, _FolderSink):
            for lv, t in units.items():
                write_text(sink.folder / f"novelty_{lv}s.csv", t.to_csv(index=False))
        m = Metrics(protocol="lomo", protocol_description=plan.description, classes=list(plan.classes),
                    levels=lomo_levels(pred, plan.table.label, plan.levels, cfg.evaluation.aggregate), excluded=plan.excluded,
                    seeds=[seed], novelty=block)
        m.context.update(self._context())
        return pred, m

    def _fold(self, fold: Fold, seed: int, progress) -> tuple[FoldResult, object]:
        cfg, n_classes = self.cfg, len(self.plan.classes)
        if cfg.mode == "frozen":
            from cellmorph.models.features import logistic_head

            cw = None if cfg.frozen.class_weight == "none" else "balanced"
            return FoldResult(logistic_head(self.features, self.y, fold.train, fold.test, n_classes, cfg.frozen.C, cw, seed)), None
        return _finetune_fold(cfg, self.images, self.y, n_classes, fold, self.plan.device, seed, progress)

    def _fold_predictions(self, i: int, fold: Fold, probs: np.ndarray) -> pd.DataFrame:
        index = self.index
        keep = [c for c in index.columns if c.startswith("Metadata_")]
        pred = index.iloc[fold.test][keep].copy()
        pred.insert(0, "fold", i)
        pred.insert(1, "fold_held_out", fold.name)
        for j, c in enumerate(self.plan.classes):
            pred[f"prob_{c}"] = probs[:, j]
        return pred.reset_index(drop=True)

    def _score(self, pred: pd.DataFrame, seed: int, curves: list[tuple]) -> Metrics:
        cfg, plan = self.cfg, self.plan
        ev = cfg.evaluation
        m = compute_metrics(pred, plan.table.label, ev.protocol, plan.description, plan.levels, ev.aggregate)
        m.excluded = plan.excluded
        m.seeds = [seed]
        m.context.update(self._context())
        m.conformal = _conformal_block(pred, plan.table.label, plan.levels, ev)
        if curves and curves[0] is not None:
            unit, xs = curves[0][0], curves[0][1]
            for k, x in enumerate(xs):
                p = pred.copy()
                p[[f"prob_{c}" for c in plan.classes]] = np.concatenate([c[2][k] for c in curves])
                mk = compute_metrics(p, plan.table.label, ev.protocol, plan.description, plan.levels, ev.aggregate)
                m.curve.append({"seed": seed, unit: int(x), **{lvl: s.accuracy for lvl, s in mk.levels.items()}})
        return m

    def _context(self) -> dict:
        cfg = self.cfg
        how = cfg.evaluation.aggregate
        levels = self.plan.levels
        agg = "none: one prediction per row is the unit scored" if levels == ["image"] else f"{how} of image probabilities per well" + (
            f", then {how} over the replicate wells of a treatment" if "treatment" in levels else "") + "; argmax"
        return {"experiment": cfg.name, "dataset": cfg.dataset.name, "model": cfg.model.name, "init": cfg.model.init, "mode": cfg.mode,
                "n_folds": len(self.plan.folds), "aggregation": agg, "store_key": self.store.key}


def _conformal_block(pred: pd.DataFrame, label: str, levels: list[str], ev) -> dict:
    """metrics.json's `conformal`: leave-one-group-out conformal coverage over the out-of-fold
    predictions, grouped by the protocol's column (the compound under loco and lcbo; each unit on
    its own under a random split). A failure is recorded as skipped, never fatal to a finished run."""
    from cellmorph.evaluation.conformal import evaluate
    from cellmorph.evaluation.splits import protocol_group

    try:
        return evaluate(pred, label, levels, ev.aggregate, protocol_group(ev))
    except CellmorphError as err:
        return {"levels": {}, "skipped": {"all": str(err)}}


def _finetune_fold(cfg: ExperimentConfig, images: torch.Tensor, y: np.ndarray, n_classes: int, fold: Fold, device, seed: int, progress):
    """Train a fresh model on the fold's training images (uint8, on the device) and score its test images,
    also at the curve points the config asks for (epochs or iterations)."""
    import torch

    from cellmorph.models.factory import create_model
    from cellmorph.models.train import fit, make_input_spec, predict_proba

    torch.manual_seed(seed)
    model = create_model(cfg.model.name, cfg.model.init, num_classes=n_classes, in_chans=images.shape[1], drop_rate=cfg.model.drop_rate)
    train_idx = torch.as_tensor(fold.train, device=images.device)
    spec = make_input_spec(model, cfg.model.input_size or default_input_size(cfg.model.name), cfg.finetune.normalize, images[train_idx])
    ft = cfg.finetune
    steps_per_epoch = max(1, len(fold.train) // min(ft.batch_size, len(fold.train)))
    task = progress.add_task(f"  training on {len(fold.train)} images", total=ft.epochs * steps_per_epoch)
    test_images = images[torch.as_tensor(fold.test, device=images.device)]
    score = lambda: predict_proba(model, test_images, spec, device, batch_size=max(ft.batch_size, 64))  # noqa: E731
    xs, points = [], []
    eval_epochs = set(range(1, ft.epochs + 1)) if ft.eval_every_epoch else set(ft.eval_epochs)

    def on_epoch(epoch: int) -> None:
        if epoch in eval_epochs:
            xs.append(epoch)
            points.append(score())

    def on_iteration(it: int, m) -> None:
        if it % ft.eval_every_iterations == 0:
            xs.append(it)
            points.append(score())
            m.train()

    every_it = ft.eval_every_iterations > 0
    if every_it:  # the untrained model too: where a curve starts
        xs.append(0)
        points.append(score())
        model.train()
    hist = fit(model, images[train_idx], y[fold.train], n_classes, ft, spec, device, seed, on_step=lambda: progress.advance(task),
               on_epoch=on_epoch if eval_epochs else None, on_iteration=on_iteration if every_it else None)
    progress.remove_task(task)
    last = ft.epochs if not every_it else ft.epochs * steps_per_epoch
    if every_it and xs[-1] != last:  # a curve by iterations ends at the trained model
        xs.append(last)
        points.append(score())
    probs = points[-1] if xs and xs[-1] == last else score()
    curve = np.stack(points).astype(np.float32) if points else None
    return FoldResult(probs, hist.__dict__, xs, "iteration" if every_it else "epoch", curve), model


# --- where fold results live: a run folder, or memory -------------------------------------------------


class _FolderSink:
    def __init__(self, folder: Path):
        self.folder = folder
        self.where = str(folder)

    def _dir(self, i: int) -> Path:
        return self.folder / "folds" / f"{i:02d}"

    def done(self, i: int) -> bool:
        return (self._dir(i) / "predictions.parquet").is_file()

    def save(self, i: int, fold: Fold, pred: pd.DataFrame, res: FoldResult, model) -> None:
        """Write the fold folder whole or not at all: its files go to a temporary folder `folds/.NN.tmp-*`,
        renamed to folds/NN once complete (a Ray task or a killed run never leaves half a fold)."""
        final = self._dir(i)
        d = _temporary_fold_dir(final)
        try:
            info = {"index": i, "held_out": fold.name, "n_train": len(fold.train), "n_test": len(fold.test)}
            if res.curve_probs is not None:
                info.update({"curve_unit": res.curve_unit, "curve_x": res.curve_x})
                write_npy(d / "curve_probs.npy", res.curve_probs)
            write_json(d / "fold.json", info)
            if res.history is not None:
                write_json(d / "history.json", res.history)
            if model is not None:
                import torch

                with atomic_path(d / "model.pt") as tmp:
                    torch.save(model.state_dict(), tmp)
            write_parquet(d / "predictions.parquet", pred)  # its presence marks the fold done
            _move_fold_dir(d, final)
        except CellmorphError as err:  # e.g. a full disk: name the fold's file, not its temporary folder
            raise CellmorphError(str(err).replace(str(d), str(final))) from None
        finally:
            _remove_own_folder(d)

    def predictions(self, i: int) -> pd.DataFrame:
        return pd.read_parquet(self._dir(i) / "predictions.parquet")

    def curve(self, i: int):
        info = json.loads((self._dir(i) / "fold.json").read_text())
        if "curve_x" not in info:
            return None
        return info["curve_unit"], info["curve_x"], np.load(self._dir(i) / "curve_probs.npy")


class _MemorySink:
    where = "memory"

    def __init__(self):
        self.results: dict[int, tuple[pd.DataFrame, FoldResult]] = {}

    def done(self, i: int) -> bool:
        return i in self.results

    def save(self, i: int, fold: Fold, pred: pd.DataFrame, res: FoldResult, model) -> None:
        self.results[i] = (pred, res)

    def predictions(self, i: int) -> pd.DataFrame:
        return self.results[i][0]

    def curve(self, i: int):
        res = self.results[i][1]
        return None if res.curve_probs is None else (res.curve_unit, res.curve_x, res.curve_probs)


def _temporary_fold_dir(final: Path) -> Path:
    import tempfile

    from cellmorph.io import process_umask

    with no_space_is_an_error(final):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            d = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        except PermissionError as err:
            raise CellmorphError(f"cannot write in {final.parent} ({err.strerror}). Choose a writable folder (--out).") from None
    os.chmod(d, 0o777 & ~process_umask())  # mkdtemp makes 0700
    return d


def _move_fold_dir(d: Path, final: Path) -> None:
    """Rename the complete temporary fold folder onto folds/NN. A folds/NN without predictions.parquet (left by
    an older cellmorph that wrote fold files in place) holds only cellmorph's files: it is replaced.

    Another attempt of the same fold (a Ray retry, or a worker of a killed driver still finishing while the
    rerun computes that fold) may finish first: its complete folder is kept, also when it lands between the
    check and the rename here."""
    if (final / "predictions.parquet").is_file():  # another attempt of this fold finished first: keep it
        return
    if final.is_dir():
        _remove_own_folder(final)
        if final.exists():
            raise CellmorphError(f"{final} holds files cellmorph did not write; move them away and rerun the same command.")
    try:
        os.rename(d, final)
    except OSError:
        if (final / "predictions.parquet").is_file():  # renamed by the other attempt just now: keep that one
            return
        raise


def _remove_own_folder(folder: Path) -> None:
    """Remove a fold folder's own files (cellmorph's file names and their temporaries), then the folder if empty."""
    if not folder.is_dir():
        return
    pattern = re.compile(r"^\.?(" + "|".join(re.escape(n) for n in RUN_FILES) + r")(\.tmp-[A-Za-z0-9_]+)?$")
    for f in folder.iterdir():
        if f.is_file() and pattern.match(f.name):
            f.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it: leave it
        pass


# --- claiming and finishing a run folder --------------------------------------------------------------


def _remove_if_empty(out: Path, existed: bool) -> None:
    """A run that fails before it starts leaves no empty folder behind (never touches one that existed)."""
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _claim_run_folder(out: Path, cfg: ExperimentConfig, store: Store) -> None:
    """Write config.toml and dataset.json, or check them on resume: a folder holds one config, computed
    from one version of the data (a changed dataset must not mix old folds with new ones)."""
    resolved = dump_toml(cfg) + "\n"
    cfg_path, data_path = out / "config.toml", out / "dataset.json"
    fingerprint = {"store_key": store.key, "rows": int(len(store.index)), "dataset": cfg.dataset.name}
    if cfg_path.is_file():
        if _what_is_computed(cfg_path.read_text()) != _what_is_computed(resolved):
            raise CellmorphError(
                f"{out} holds a run of a different config ({cfg_path} differs). Resume it with the same config, or choose another --out."
            )
        if data_path.is_file():
            old = json.loads(data_path.read_text())
            if old.get("store_key") != store.key:
                raise CellmorphError(
                    f"{out} holds results computed from other data: the dataset changed since that run "
                    f"({old.get('rows')} rows then, {len(store.index)} now; fingerprint {old.get('store_key')} vs {store.key}). "
                    "Choose another --out for the new data (or delete the old run folder to start over)."
                )
    _clean_own_temporaries(out)
    write_text(cfg_path, resolved)
    write_json(data_path, fingerprint)


def _what_is_computed(config_toml: str) -> dict:
    """A resolved config without its [execution] section: where the folds run does not change their numbers,
    so a run started on Ray resumes locally (and back)."""
    import tomllib

    data = tomllib.loads(config_toml)
    data.pop("execution", None)
    return data


def _clean_own_temporaries(out: Path) -> None:
    """Remove temporaries a killed run left: only `.NAME.tmp-*` of cellmorph's own file names, in the
    run folder's own subfolders (folds/, seeds/), never anything else."""
    pattern = re.compile(r"^\.(" + "|".join(re.escape(n) for n in RUN_FILES) + r")\.tmp-[A-Za-z0-9_]+$")
    for tmp_fold in [*out.glob("folds/.[0-9][0-9].tmp-*"), *out.glob("seeds/*/folds/.[0-9][0-9].tmp-*")]:
        _remove_own_folder(tmp_fold)  # a fold a killed run (or Ray task) was writing
    folders = [out, *out.glob("folds/[0-9][0-9]"), *out.glob("seeds/*"), *out.glob("seeds/*/folds/[0-9][0-9]")]
    for folder in folders:
        for f in folder.iterdir():
            if f.is_file() and pattern.match(f.name):
                f.unlink(missing_ok=True)
    # a killed save of the final model (bundle.save_bundle): its temporary or set-aside bundle folders,
    # removed only when they hold nothing but bundle files
    from cellmorph.models.bundle import BUNDLE_FILES

    for d in out.glob(f".{MODEL_DIR}.*-*"):
        if d.is_dir() and re.fullmatch(rf"\.{MODEL_DIR}\.(tmp|old)-[A-Za-z0-9_]+", d.name):
            files = [f for f in d.rglob("*") if f.is_file()]
            if all(f.name in BUNDLE_FILES for f in files):
                shutil.rmtree(d)


def _finish(out: Path, cfg: ExperimentConfig, plan: Plan, pred: pd.DataFrame, metrics: Metrics) -> None:
    from cellmorph.evaluation.metrics import aggregate
    from cellmorph.reporting.outputs import write_outputs
    from cellmorph.reporting.report import write_confusion_png, write_report

    from cellmorph.reporting.report import write_conformal_pngs, write_novelty_png

    write_parquet(out / "predictions.parquet", pred)
    label, how = plan.table.label, cfg.evaluation.aggregate
    lomo = cfg.evaluation.protocol == "lomo"
    for level, fname in (("treatment", "treatments.csv"), ("well", "wells.csv")):
        if level in metrics.levels and not lomo:  # lomo: novelty_<level>s.csv instead (a unit per round)
            groups = [g for _, g in pred.groupby("seed")] if "seed" in pred.columns else [pred]
            table = pd.concat([aggregate(g, level, label, how).assign(**({"seed": g["seed"].iloc[0]} if "seed" in g.columns else {})) for g in groups])
            write_text(out / fname, table.to_csv(index=False))
    title = f"{cfg.name}: {cfg.model.name} ({cfg.mode}), {cfg.evaluation.protocol}"
    first = pred[pred["seed"] == cfg.seed_list[0]] if "seed" in pred.columns else pred
    if lomo:
        folder = out if len(cfg.seed_list) == 1 else out / "seeds" / str(cfg.seed_list[0])
        write_novelty_png(out / "novelty.png", folder, metrics, title)
    else:
        write_confusion_png(out / "confusion.png", first, metrics, label, title, how)
        write_conformal_pngs(out, metrics, title)
    write_outputs(cfg.outputs, out, cfg, plan.table, pred, metrics)
    write_report(out / "report.html", metrics, cfg)
    metrics.write(out / "metrics.json")
