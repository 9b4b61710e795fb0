"""The one runner: every experiment (BBBC021 MoA, translocation plates, nuclei, the lab's LeNet) is a
config of it. Config in, folds of the chosen protocol, one model per fold and seed, predictions,
metrics and report out; resumable at fold granularity (the run folder: cellmorph.engine.runfolder).

`run_experiment` writes a run folder; `cross_validate_config` runs the same folds in memory, writing
nothing. A protocol that scores its folds itself (Protocol.runner: lomo) runs in memory, without
per-fold resume; its unit tables go to novelty_<level>s.csv and novelty.png replaces confusion.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cellmorph.config import ExperimentConfig
from cellmorph.data.store import Store, open_store
from cellmorph.data.table import ImageTable, labelled_mask
from cellmorph.engine.final_model import save_final_model
from cellmorph.engine.folds import FoldEngine
from cellmorph.engine.plan import Plan, device_details, environment, plan_run
from cellmorph.engine.runfolder import FolderSink, MemorySink, claim_run_folder
from cellmorph.evaluation.aggregate import aggregate
from cellmorph.evaluation.metrics import Metrics, class_balance, combine_seeds
from cellmorph.io import check_writable, write_json, write_parquet, write_text
from cellmorph.progress import console
from cellmorph.reporting.outputs import write_outputs
from cellmorph.reporting.report import write_confusion_png, write_conformal_pngs, write_novelty_png, write_report
from cellmorph.reporting.sections import write_training_curves
from cellmorph.storage import MODEL_DIR, RUN, claim, locked, seed_folder


def run_experiment(cfg: ExperimentConfig, out: str | Path, data_dir: str | Path | None = None, context: dict | None = None) -> Metrics:
    """Run (or resume) the experiment into the run folder `out`; return its metrics.

    Args:
        cfg: a validated config (`cellmorph.config.load_config`).
        out: the run folder; a rerun with the same folder resumes at the first missing fold.
        data_dir: the folder holding the datasets (default: $CELLMORPH_DATA).
        context: more entries for metrics.json's context (e.g. `cellmorph tune`'s record of its candidates).
    Returns:
        The run's `Metrics` (also written to out/metrics.json).

    Example:
        >>> from cellmorph.config import load_config
        >>> m = run_experiment(load_config("configs/quickstart.toml"), "runs/quickstart")
        >>> m.level("treatment").correct, m.level("treatment").total
        (55, 55)
    """
    out = Path(out)
    plan = plan_run(cfg, data_dir)
    with locked(out):
        claim(out, RUN)  # before decoding anything: a user's files refused, our leftovers removed
        existed = out.exists()
        check_writable(out)
        try:
            # A bad image file stops us here, before the folder is this run's: fine-tuning decodes every image into
            # memory (or, too many, resizes them onto disk); a frozen run streams them through the backbone once (or
            # finds their features in the cache).
            store = open_store(plan.table, cfg.dataset.image_size)
            engine = FoldEngine(plan, store)
            engine.load_pixels()
        except BaseException:
            if not existed and out.is_dir() and not any(out.iterdir()):  # a run that fails before it starts leaves no folder
                out.rmdir()
            raise
        claim_run_folder(out, cfg, store.key, len(store.index))
        return _run(out, cfg, plan, store, engine, context or {})


def _run(out: Path, cfg: ExperimentConfig, plan, store: Store, engine: FoldEngine, context: dict) -> Metrics:
    console.print(f"split: {plan.description}", highlight=False, markup=False)  # once the run has started (an error stays one line)
    env = environment(cfg, plan.device_setting)
    write_json(out / "environment.json", env)
    t0 = time.perf_counter()
    sinks = {seed: FolderSink(seed_folder(out, seed, cfg.seed_list)) for seed in cfg.seed_list}
    own_runner = plan.protocol.runner is not None  # e.g. lomo: its heads run in memory, in this process
    if not own_runner:
        engine.run_folds(sinks)  # every seed's missing folds: in this process, or as Ray tasks ([execution])
    if engine.execution:
        env = {**env, "execution": engine.execution}
        write_json(out / "environment.json", env)
    per_seed, preds = [], []
    for seed, sink in sinks.items():
        folder = sink.folder
        if own_runner:
            pred, m, tables = engine.run_protocol(seed)
            for name, t in tables.items():  # the protocol's own unit tables (lomo: novelty_<level>s.csv)
                write_text(folder / name, t.to_csv(index=False))
        else:
            pred, m = engine.collect(seed, sink)
        if len(cfg.seed_list) > 1:
            write_parquet(folder / "predictions.parquet", pred)
            m.write(folder / "metrics.json")
            pred = pred.assign(seed=seed)
        per_seed.append(m)
        preds.append(pred)
    metrics = combine_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
    metrics.context["seconds_in_folds_this_invocation"] = round(time.perf_counter() - t0, 2)
    metrics.context["class_balance"] = training_balance(cfg, plan.table)
    metrics.context.update(context)
    if plan.resolved_device is not None:  # a network ran: record the device it ran on
        write_json(out / "environment.json", {**env, "device": str(plan.resolved_device), **device_details(plan.resolved_device)})
    pred = pd.concat(preds, ignore_index=True)
    if cfg.save_model and own_runner:  # its predictions are not leave-one-group-out scores of one model's classes
        console.print(f"final model: not saved under the {cfg.evaluation.protocol} protocol (run the same config with protocol loco to get one)")
    elif cfg.save_model:
        save_final_model(out / MODEL_DIR, cfg, plan, store, preds[0].drop(columns="seed", errors="ignore"))
    _finish(out, cfg, plan, pred, metrics)
    return metrics


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
    store = open_store(plan.table, cfg.dataset.image_size)
    engine = FoldEngine(plan, store)
    per_seed, preds = [], []
    for seed in cfg.seed_list:
        pred, m, _ = engine.run_seed(seed, MemorySink())
        per_seed.append(m)
        preds.append(pred.assign(seed=seed) if len(cfg.seed_list) > 1 else pred)
    metrics = combine_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
    metrics.context["class_balance"] = training_balance(cfg, plan.table)
    return CVResult(metrics, pd.concat(preds, ignore_index=True))


def training_balance(cfg: ExperimentConfig, table: ImageTable) -> dict:
    """Labelled images per class and whether this config's training weighs the classes (`class_balance`),
    with the config field that switches the weights (`setting`)."""
    frozen = cfg.mode == "frozen"
    weighted = cfg.frozen.class_weight != "none" if frozen else cfg.finetune.class_weights
    labels = table.df.loc[labelled_mask(table.df, table.label), table.label]
    return class_balance(labels, weighted, 'frozen.class_weight = "none"' if frozen else "finetune.class_weights = false")


def _finish(out: Path, cfg: ExperimentConfig, plan: Plan, pred: pd.DataFrame, metrics: Metrics) -> None:
    write_parquet(out / "predictions.parquet", pred)
    label, how = plan.table.label, cfg.evaluation.aggregate
    own_runner = plan.protocol.runner is not None
    for level, fname in (("treatment", "treatments.csv"), ("well", "wells.csv")):
        if level in metrics.levels and not own_runner:  # lomo: novelty_<level>s.csv instead (a unit per round)
            groups = [g for _, g in pred.groupby("seed")] if "seed" in pred.columns else [pred]
            table = pd.concat([aggregate(g, level, label, how).assign(**({"seed": g["seed"].iloc[0]} if "seed" in g.columns else {})) for g in groups])
            write_text(out / fname, table.to_csv(index=False))
    title = f"{cfg.name}: {cfg.model.name} ({cfg.mode}), {cfg.evaluation.protocol}"
    first = pred[pred["seed"] == cfg.seed_list[0]] if "seed" in pred.columns else pred
    if metrics.novelty:
        write_novelty_png(out / "novelty.png", seed_folder(out, cfg.seed_list[0], cfg.seed_list), metrics, title)
    else:
        write_confusion_png(out / "confusion.png", first, metrics, label, title, how)
        write_conformal_pngs(out, metrics, title)
    write_training_curves(seed_folder(out, cfg.seed_list[0], cfg.seed_list), out, metrics.curve, title)
    write_outputs(cfg.outputs, out, cfg, plan.table, pred, metrics)
    write_report(out / "report.html", metrics, cfg, first, plan.table)
    metrics.write(out / "metrics.json")
