"""The fold loop: one plan's folds on one store, frozen (cached features + a logistic head per fold) or
fine-tuned (a fresh network per fold), here one after another or as Ray tasks; the scores of a seed.

A fold's numbers are a function of (config, store, fold, seed) and, fine-tuning on a CPU, the torch thread
count: the same on either backend. torch, timm and the training code are imported where a network is built
or run: a frozen run whose features are cached never loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import copy

import numpy as np
import pandas as pd

from cellmorph.config import ExperimentConfig
from cellmorph.data.store import Store
from cellmorph.data.table import PATH_PREFIX, labelled_mask
from cellmorph.engine.plan import Plan, torch_threads
from cellmorph.engine.runfolder import FolderSink, FoldResult
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.conformal import evaluate
from cellmorph.evaluation.metrics import Metrics, compute_metrics
from cellmorph.evaluation.protocols import protocol_group
from cellmorph.evaluation.splits import Fold
from cellmorph.models.features import C_GRID, FEATURE_SETS, extract_features, head_C, last_width, logistic_head
from cellmorph.models.names import default_input_size
from cellmorph.progress import console, make_progress

if TYPE_CHECKING:
    import torch


class FoldEngine:
    """Runs the folds of a plan on one store: frozen (cached features + logistic head) or fine-tuning, here or
    on Ray (the fold function `compute_fold` is handed to cellmorph.engine.ray_backend)."""

    def __init__(self, plan: Plan, store: Store):
        self.plan, self.store = plan, store
        cfg = plan.cfg
        label = plan.table.label
        # Labels and metadata come from the dataset's table (e.g. middle doses unlabelled there); the
        # store only holds the pixels, row for row.
        self.index = plan.table.df
        if len(store.index) != len(self.index):
            raise CellmorphError(f"the image store holds {len(store.index)} images but the dataset {len(self.index)} rows; rebuild it (delete the cache folder).")
        lab = labelled_mask(self.index, label)
        cls = {c: i for i, c in enumerate(plan.classes)}
        self.y = np.where(lab, self.index[label].astype(str).map(cls).fillna(-1).to_numpy(), -1).astype(np.int64)
        self.features = self.images = None
        self.tail = None  # frozen.features = "auto": the last-layer width, the tail of the stage-pooled vector
        self.cfg = cfg
        self.execution: dict = {}  # how the folds ran, when not in this process (environment.json)

    def prepare(self) -> None:
        cfg = self.cfg
        if cfg.mode == "frozen" and self.features is None:
            self.features = extract_features(self.store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, lambda: self.plan.device,
                                             stages=cfg.frozen.stage_pooled)
            self.tail = last_width(cfg.model) if cfg.frozen.features == "auto" else None
        elif cfg.mode == "finetune" and self.images is None:
            import torch

            from cellmorph.models.train import disk_images, fits_in_memory, resize_uint8_stack

            size = cfg.model.input_size or default_input_size(cfg.model.name)
            if self.store.decoded or fits_in_memory(self.store.shape, size):
                # The whole uint8 store goes to the device once, resized once; folds index it there.
                self.images = resize_uint8_stack(torch.from_numpy(np.asarray(self.store.images)).to(self.plan.device), size)
            else:  # too large: resized once into the cache by streaming, then read batch by batch (memory-mapped)
                n, c = self.store.shape[:2]
                console.print(f"fine-tuning reads its images from disk: {n} x {c} x {size} x {size} uint8 (and the decoded store) exceed the "
                              "memory budget (half the available memory, or CELLMORPH_MEMORY_MB)")
                self.images = disk_images(self.store, size, self.plan.device)

    def load_pixels(self) -> None:
        """Decode what the folds will read, now (a bad image file stops the run before it starts): frozen, the features
        (streamed through the backbone, or from the cache); fine-tuning, the store in memory, or resized on disk
        when it does not fit (`prepare`, which Ray workers run again on their side)."""
        if self.cfg.mode == "frozen":
            self.prepare()
            return
        from cellmorph.models.train import fits_in_memory

        size = self.cfg.model.input_size or default_input_size(self.cfg.model.name)
        if fits_in_memory(self.store.shape, size):
            self.store.images  # noqa: B018 - decoded into memory now
        elif self.cfg.execution.backend == "local":
            self.prepare()

    def for_workers(self) -> FoldEngine:
        """A copy to ship to Ray workers once: frozen, with the features (prepared here) and no pixels (the heads
        need none); fine-tuning, with the uint8 store (each worker resizes it once, `prepare`)."""
        if self.cfg.mode == "frozen":
            self.prepare()  # features once, here; they travel with the engine
        shipped = copy.copy(self)
        if self.cfg.mode == "frozen":
            shipped.store = self.store.without_pixels()
        return shipped

    def run_seed(self, seed: int, sink) -> tuple[pd.DataFrame, Metrics, dict]:
        """One seed's predictions, metrics and extra unit tables: its folds computed where missing (in this
        process), or, for a protocol that scores its folds itself (Protocol.runner, e.g. lomo), that."""
        if self.plan.protocol is not None and self.plan.protocol.runner is not None:
            return self.run_protocol(seed)
        self.run_folds({seed: sink}, local=True)
        return (*self.collect(seed, sink), {})

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
            self.prepare()
        with make_progress() as progress:
            what = f"{self.cfg.evaluation.protocol} folds" + (f" x {len(sinks)} seeds" if many else "") + (" on Ray" if ray else "")
            task = progress.add_task(what, total=total, completed=total - len(jobs))
            if jobs and ray:
                from importlib.metadata import version

                from cellmorph.engine.ray_backend import run_on_ray

                ex = self.cfg.execution
                devices = run_on_ray(self, jobs, progress, task, fold_task)
                self.execution = {"backend": "ray", "ray": version("ray"), "address": ex.address or "local cluster", "cpus_per_task": ex.cpus_per_task,
                                  "torch_threads": ex.threads or ex.cpus_per_task, "gpus_per_task": ex.gpus_per_task, "task_devices": devices, "tasks_this_invocation": len(jobs)}
                return
            with torch_threads(self.cfg.execution.threads if self.cfg.mode == "finetune" else 0):
                self._run_here(jobs, progress, task)

    def _run_here(self, jobs: list, progress, task) -> None:
        folds, many = self.plan.folds, len(self.cfg.seed_list) > 1
        for seed, i, sink in jobs:
            fold = folds[i]
            progress.update(task, description=f"fold {i + 1}/{len(folds)}: {self.fold_label(fold)}" + (f", seed {seed}" if many else ""))
            self.compute_fold(seed, i, sink, progress)
            progress.advance(task)

    def fold_label(self, fold: Fold) -> str:
        """What a fold holds out, for progress: "Metadata_Patient=9" when its name is the one value of the protocol's
        group among its test rows (leave-one-group-out), else its name ("random", "Metadata_Patient fold 2/5")."""
        group = protocol_group(self.cfg.evaluation)
        if group and group in self.index.columns:
            values = self.index[group].iloc[fold.test].astype(str).unique()
            if len(values) == 1 and values[0] == str(fold.name):
                return f"{group}={fold.name}"
        return str(fold.name)

    def compute_fold(self, seed: int, i: int, sink, progress) -> None:
        """Fold `i` of seed `seed`: the model (seeded by seed * 1000 + i), its test predictions, saved in `sink`
        (and its network when finetune.save_models). The one fold function, here and in a Ray task."""
        fold = self.plan.folds[i]
        res, model = self.fold(fold, seed * 1000 + i, progress)
        sink.save(i, fold, self.fold_predictions(i, fold, res.probs), res, model if self.cfg.finetune.save_models else None)

    def collect(self, seed: int, sink) -> tuple[pd.DataFrame, Metrics]:
        """The seed's predictions (fold by fold, in fold order) and metrics, from its sink."""
        folds = self.plan.folds
        pred = pd.concat([sink.predictions(i) for i in range(len(folds))], ignore_index=True)
        m = self.score(pred, seed, [sink.curve(i) for i in range(len(folds))])
        chosen = [(h or {}).get("frozen_C") for h in (sink.history(i) for i in range(len(folds)))]
        if any(chosen):  # frozen.C or frozen.features = "auto": what each fold's inner split chose
            m.context["frozen_C_chosen"] = {"grid": list(C_GRID) if self.cfg.frozen.C == "auto" else [float(self.cfg.frozen.C)],
                                            "per_fold": [c and c["C"] for c in chosen],
                                            "inner": [c for c in chosen], "score": "balanced accuracy of the inner split"}
            if self.cfg.frozen.features == "auto":
                m.context["frozen_C_chosen"] |= {"feature_sets": list(FEATURE_SETS), "features_per_fold": [c and c["features"] for c in chosen]}
        return pred, m

    def run_protocol(self, seed: int) -> tuple[pd.DataFrame, Metrics, dict]:
        """A protocol that scores its own folds in memory (Protocol.runner: lomo's rounds of heads on the frozen
        features). Returns its predictions, Metrics and unit tables ({file name: DataFrame})."""
        plan = self.plan
        self.prepare()
        with make_progress() as progress:
            pred, m, units = plan.protocol.runner(self.features, self.y, self.index, plan.folds, plan.classes, plan.table.label, plan.levels,
                                                  plan.description, plan.excluded, self.cfg, seed, progress=progress)
        m.context.update(self.context())
        return pred, m, units

    def fold(self, fold: Fold, seed: int, progress) -> tuple[FoldResult, object]:
        cfg, n_classes = self.cfg, len(self.plan.classes)
        if cfg.mode == "frozen":
            cw = None if cfg.frozen.class_weight == "none" else "balanced"
            group = protocol_group(cfg.evaluation)
            groups = self.index[group].to_numpy()[fold.train] if group and group in self.index.columns else None
            C, cols, chosen = head_C(cfg.frozen.C, self.features[fold.train], self.y[fold.train], groups, cw, seed, cfg.frozen.features, self.tail)
            probs = logistic_head(self.features[:, cols], self.y, fold.train, fold.test, n_classes, C, cw, seed)
            return FoldResult(probs, history={"frozen_C": chosen} if chosen else None), None
        return finetune_fold(cfg, self.images, self.y, n_classes, fold, self.plan.device, seed, progress)

    def fold_predictions(self, i: int, fold: Fold, probs: np.ndarray) -> pd.DataFrame:
        index = self.index
        keep = [c for c in index.columns if c.startswith("Metadata_")] + [c for c in index.columns if c.startswith(PATH_PREFIX)]
        pred = index.iloc[fold.test][keep].copy()  # with the image files' paths: each row traceable to its file
        pred.insert(0, "fold", i)
        pred.insert(1, "fold_held_out", fold.name)
        for j, c in enumerate(self.plan.classes):
            pred[f"prob_{c}"] = probs[:, j]
        return pred.reset_index(drop=True)

    def score(self, pred: pd.DataFrame, seed: int, curves: list[tuple]) -> Metrics:
        cfg, plan = self.cfg, self.plan
        ev = cfg.evaluation
        m = compute_metrics(pred, plan.table.label, ev.protocol, plan.description, plan.levels, ev.aggregate)
        m.excluded = plan.excluded
        m.seeds = [seed]
        m.context.update(self.context())
        m.conformal = conformal_block(pred, plan.table.label, plan.levels, ev)
        if curves and curves[0] is not None:
            unit, xs = curves[0][0], curves[0][1]
            for k, x in enumerate(xs):
                p = pred.copy()
                p[[f"prob_{c}" for c in plan.classes]] = np.concatenate([c[2][k] for c in curves])
                mk = compute_metrics(p, plan.table.label, ev.protocol, plan.description, plan.levels, ev.aggregate)
                m.curve.append({"seed": seed, unit: int(x), **{lvl: s.accuracy for lvl, s in mk.levels.items()}})
        return m

    def context(self) -> dict:
        cfg = self.cfg
        how = cfg.evaluation.aggregate
        levels = self.plan.levels
        agg = "none: one prediction per row is the unit scored" if levels == ["image"] else f"{how} of image probabilities per well" + (
            f", then {how} over the replicate wells of a treatment" if "treatment" in levels else "") + "; argmax"
        return {"experiment": cfg.name, "dataset": cfg.dataset.name, "model": cfg.model.name, "init": cfg.model.init, "mode": cfg.mode,
                "n_folds": len(self.plan.folds), "aggregation": agg, "store_key": self.store.key}


def conformal_block(pred: pd.DataFrame, label: str, levels: list[str], ev) -> dict:
    """metrics.json's `conformal`: leave-one-group-out conformal coverage over the out-of-fold
    predictions, grouped by the protocol's column (the compound under loco and lcbo; each unit on
    its own under a random split). A failure is recorded as skipped, never fatal to a finished run."""
    try:
        return evaluate(pred, label, levels, ev.aggregate, protocol_group(ev))
    except CellmorphError as err:
        return {"levels": {}, "skipped": {"all": str(err)}}


def finetune_fold(cfg: ExperimentConfig, images: torch.Tensor, y: np.ndarray, n_classes: int, fold: Fold, device, seed: int, progress):
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
    score = lambda: predict_proba(model, test_images, spec, device, batch_size=max(ft.batch_size, 64), tta=ft.tta)  # noqa: E731
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


def fold_task(engine: FoldEngine, seed: int, i: int, folder: str) -> str:
    """What a Ray task runs (handed to cellmorph.engine.ray_backend.run_on_ray): fold `i` of `seed` into the
    run folder `folder`, as locally. Returns the device the fold ran on."""
    engine.compute_fold(seed, i, FolderSink(folder), NullProgress())
    return str(engine.plan.resolved_device) if engine.cfg.mode == "finetune" else "cpu"


class NullProgress:
    """What a task's fold code reports progress to: nothing (the driver's bar advances per finished task)."""

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass
