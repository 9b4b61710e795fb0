"""The final model of a run (`save_model = true`): the folds' recipe fitted on every labelled row, saved as a
bundle in RUN/model with the out-of-fold predictions as its conformal calibration data and, for frozen
models, the training units' reference profiles (the distance novelty score). A frozen model whose features
and backbone weights are cached is written from the cache without importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.config import override as override_config
from cellmorph.data.store import Store
from cellmorph.data.store import trained_on as describe_training
from cellmorph.data.table import PATH_PREFIX, labelled_mask
from cellmorph.data.quality import image_numbers, store_qc
from cellmorph.engine.plan import Plan
from cellmorph.engine.runfolder import what_is_computed
from cellmorph.evaluation.protocols import protocol_group
from cellmorph.evaluation.novelty import image_group_column, image_reference, reference_profiles, reference_sample
from cellmorph.models.bundle import META, bundle_meta, save_bundle
from cellmorph.models.features import cached_backbone, cached_features, frozen_head, head_C, head_groups, last_width
from cellmorph.progress import console, make_progress


def save_final_model(path: Path, cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame) -> Path:
    """Fit the final model on every labelled row (the folds' recipe: frozen = cached features + logistic
    head, finetune = one more training) and save it as a bundle at `path` with the out-of-fold predictions
    `oof` (one seed's) as its calibration data. A bundle already there from the same data and seed is
    kept (a resumed run does not fit it again).

    Example:
        >>> save_final_model(Path("runs/quickstart/model"), cfg, plan, store, pred)
        PosixPath('runs/quickstart/model')
    """
    seed = cfg.seed_list[0]
    final_cfg = cfg if cfg.seed == seed else override_config(cfg, {"seed": seed})
    if (path / META).is_file():
        try:
            done = json.loads((path / META).read_text()).get("trained_on", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            done = {}
        if done.get("store_key") == store.key and done.get("seed") == seed and (path / "config.toml").is_file() \
                and what_is_computed((path / "config.toml").read_text()) == what_is_computed(dump_toml(final_cfg)):
            console.print(f"final model: {path} already fitted on this data (kept)")
            return path
    label = plan.table.label
    n = int(labelled_mask(plan.table.df, label).sum())
    if cfg.mode == "frozen" and _save_frozen_from_cache(path, final_cfg, plan, store, oof):
        return path
    from cellmorph.models.classifier import Classifier  # here: it imports torch, which a warm frozen run never loads

    clf = Classifier(config=final_cfg)
    with make_progress() as progress:
        if cfg.mode == "finetune":
            steps = cfg.finetune.epochs * max(1, n // min(cfg.finetune.batch_size, n))
            task = progress.add_task(f"final model on all {n} labelled images", total=steps)
            clf.fit_store(plan.table, store, final_cfg, on_step=lambda: progress.advance(task))
        else:
            task = progress.add_task(f"final model on all {n} labelled images", total=1)
            clf.fit_store(plan.table, store, final_cfg, group=protocol_group(cfg.evaluation))
            progress.advance(task)
    clf.calibration, clf.calibration_info = _calibration(cfg, plan, store, oof, seed)
    clf.reference = _reference(cfg, plan, store)
    clf.image_reference = _image_reference(cfg, plan, store, clf=clf)
    saved = clf.save(path, overwrite=True)
    cal = "no calibration data" if clf.calibration is None else f"calibrated on {len(clf.calibration)} out-of-fold predictions"
    console.print(f"final model: {path} ({cfg.mode}, fitted on all {n} labelled images; {cal})")
    return saved


def _calibration(cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame, seed: int) -> tuple[pd.DataFrame | None, dict | None]:
    """The final model's calibration data: the labelled out-of-fold predictions, and what they are."""
    label = plan.table.label
    if label not in oof.columns:
        return None, None
    info = {"what": "out-of-fold predictions of the cross-validation (each row scored by a fold model that never saw its group)",
            "protocol": cfg.evaluation.protocol, "folds": len(plan.folds), "seed": seed, "label": label,
            "aggregate": cfg.evaluation.aggregate, "store_key": store.key}
    cal = oof[labelled_mask(oof, label)].reset_index(drop=True)
    return cal.drop(columns=[c for c in cal.columns if c.startswith(PATH_PREFIX)]), info  # a bundle names no files of the lab's disk


def _reference(cfg: ExperimentConfig, plan: Plan, store: Store, feats: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The reference profiles of the distance novelty score (novelty.reference_profiles) of a frozen final
    model: its labelled training rows' cached backbone features (numpy only). None for fine-tuned models
    (their pre-logit features are not what novelty.py measured) and when the features are not cached."""
    if cfg.mode != "frozen" or "Metadata_Compound" not in plan.table.df.columns:
        return None
    feats = cached_features(store, cfg.model, cfg.frozen.tta, stages=cfg.frozen.stage_pooled) if feats is None else feats
    if feats is None:
        return None
    table = plan.table
    idx = np.flatnonzero(labelled_mask(table.df, table.label))
    return reference_profiles(feats[idx], table.df.iloc[idx], table.label, cfg.evaluation.aggregate)


def _image_reference(cfg: ExperimentConfig, plan: Plan, store: Store, clf=None, feats: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The image novelty score's reference (novelty.image_reference) of the final model: up to 1,000 of its labelled
    training images (a sample seeded by the config's seed), their features (`feats`: the cached frozen features of
    every row; else computed through `clf`, the fitted final model: a fine-tuned network's pre-logits) and their
    QC focus (the out-of-focus threshold) and intensity profiles, calibration groups by novelty.image_group_column."""
    table = plan.table
    idx = np.flatnonzero(labelled_mask(table.df, table.label))
    rows = idx[reference_sample(len(idx), cfg.seed_list[0])]
    column = image_group_column(table.df)
    groups = table.df[column].astype(str).to_numpy()[rows] if column else None
    if feats is not None:
        qc = store_qc(store)  # cached by the feature pass: no second decode
        f, focus, profiles = feats[rows], qc["qc_focus"][rows], qc["profile"][rows]
    else:
        out = clf.outputs(store.batches(clf.batch_size, rows=rows), features=True, per_batch=lambda images, _, __: image_numbers(images))
        f, focus, profiles = out["features"], out["qc_focus"], out["profile"]
    space = "frozen backbone features" if cfg.mode == "frozen" else "the fine-tuned network's pre-logit features"
    return image_reference(f, groups, column, space, focus, n_training=len(idx), profiles=profiles)


def _save_frozen_from_cache(path: Path, cfg: ExperimentConfig, plan: Plan, store: Store, oof: pd.DataFrame) -> bool:
    """A frozen final model from the cached features and the backbone weights cached beside them: the same
    bundle `Classifier.fit(...).save(...)` writes (the same head fit on the same features, the same weights),
    without importing torch or timm, so a warm frozen run stays fast. False when the weights are not cached
    (a random backbone, or features cached by an older cellmorph): the caller then fits through Classifier."""
    m, fz = cfg.model, cfg.frozen
    if m.init in ("random", "xavier", "gaussian"):
        return False
    stages = fz.stage_pooled
    feats, backbone = cached_features(store, m, fz.tta, stages=stages), cached_backbone(store, m, fz.tta, stages=stages)
    if feats is None or backbone is None:
        return False
    weights, spec = backbone
    table = plan.table
    idx = np.flatnonzero(labelled_mask(table.df, table.label))
    y = table.df[table.label].astype(str).map({c: i for i, c in enumerate(plan.classes)}).to_numpy()[idx].astype(np.int64)
    cw = None if fz.class_weight == "none" else "balanced"
    C, cols, _ = head_C(fz.C, feats[idx], y, head_groups(table.df, protocol_group(cfg.evaluation), idx), cw, cfg.seed, fz.features,
                        last_width(m) if fz.features == "auto" else None)
    arrays = frozen_head(feats[idx], y, C, cols, cw, cfg.seed)
    tensors = {**{f"backbone.{k}": v for k, v in weights.items()}, **{f"head.{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}}
    trained_on = describe_training(table, store, len(idx), cfg.seed)
    calibration, info = _calibration(cfg, plan, store, oof, cfg.seed)
    meta = bundle_meta(cfg, plan.classes, store.shape[1], spec["size"], spec["mean"], spec["std"], spec["normalize"], trained_on,
                       info, len(calibration) if calibration is not None else 0)
    save_bundle(path, tensors, meta, cfg, overwrite=True, calibration=calibration, reference=_reference(cfg, plan, store, feats),
                image_reference=_image_reference(cfg, plan, store, feats=feats))
    console.print(f"final model: {path} (frozen head on all {len(idx)} labelled images, backbone weights from the feature cache)")
    return True
