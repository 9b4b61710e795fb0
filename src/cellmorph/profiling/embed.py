"""Per-image embeddings out of a run folder or a model bundle: a frozen run's cached backbone features, or
for a fine-tuned cross-validated run each fold model's pooled pre-logit features of the images it held out;
written as embeddings.parquet (`Metadata_*` columns, `Image_CNN_<model>_NNNN` features) with the well and
treatment profiles (`tables.well_and_treatment_profiles`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.io import write_parquet
from cellmorph.profiling.tables import (
    COMPOUND, CONCENTRATION, EMBEDDINGS, TREATMENT_PROFILES, WELL_KEYS, WELL_PROFILES, feature_prefix, well_and_treatment_profiles,
)
from cellmorph.progress import console
from cellmorph.storage import EMBEDDINGS as EMBEDDINGS_FOLDER
from cellmorph.storage import RUN, fold_folder, seed_folder, writing


def embeddings_table(meta: pd.DataFrame, feats: np.ndarray, model: str) -> pd.DataFrame:
    """One row per image: its Metadata_* columns, then one float32 column per embedding dimension."""
    keep = meta[[c for c in meta.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    names = [f"{feature_prefix(model)}{i:04d}" for i in range(feats.shape[1])]
    return pd.concat([keep, pd.DataFrame(np.asarray(feats, dtype=np.float32), columns=names)], axis=1)


@dataclass
class EmbedResult:
    embeddings: pd.DataFrame
    wells: pd.DataFrame | None
    treatments: pd.DataFrame | None
    out: Path
    how: str


def embed(source: str | Path, out: str | Path | None = None, data: str | Path | None = None, images: str | Path | None = None,
          execution=None) -> EmbedResult:
    """Per-image embeddings of a run folder or a model bundle, plus well and treatment profiles.

    Args:
        source: a run folder (`cellmorph run`) or a model bundle (`Classifier.save`).
        out: where to write embeddings.parquet, profiles_well.parquet and profiles_treatment.parquet;
            default: the run folder itself (a bundle needs `out`: a bundle folder holds only its own files).
        data: the folder holding the datasets (default $CELLMORPH_DATA).
        images: new images to embed with the bundle (or a run's final model) instead of its own dataset: a CSV
            (folder format or CellProfiler LoadData) or a folder of image files, as `cellmorph predict` reads them.
            Streamed shard by shard (a plate, or 2,048 fields), resumable, on Ray with `execution` (engine/screen.py).
    Returns:
        An `EmbedResult` (tables and the folder written).

    Example:
        >>> res = embed("runs/quickstart")
        >>> res.embeddings.shape, len(res.treatments)
        ((660, 1289), 55)
    """
    source = Path(source)
    if images is not None:
        bundle = source if (source / "bundle.json").is_file() else source / "model"
        if not (bundle / "bundle.json").is_file():
            raise CellmorphError(f"{source}: --images needs a model bundle (RUN/model, or a folder written by Classifier.save); none there.")
        if out is None:
            raise CellmorphError("--images: say where to write the embeddings with --out DIR (beside neither the model nor the images).")
        return _embed_images(bundle, images, Path(out), execution)
    if (source / "bundle.json").is_file():
        if out is None:
            raise CellmorphError(f"{source} is a model bundle: say where to write the embeddings with --out DIR (a bundle folder holds only its own files).")
        emb, how = _embed_bundle(source, data)
    elif (source / "config.toml").is_file() and (source / "dataset.json").is_file():
        emb, how = _embed_run(source, data)
    else:
        raise CellmorphError(f"{source}: neither a run folder (config.toml + dataset.json) nor a model bundle (bundle.json). Pass the folder `cellmorph run` or `Classifier.save` wrote.")
    out = Path(out) if out is not None else source
    wells = treatments = None
    if set(WELL_KEYS + [COMPOUND, CONCENTRATION]) <= set(emb.columns):
        wells, treatments = well_and_treatment_profiles(emb)
    with writing(out, RUN if out.resolve() == source.resolve() else EMBEDDINGS_FOLDER):  # a user's folder is refused, not overwritten
        write_parquet(out / EMBEDDINGS, emb)
        if wells is not None:
            write_parquet(out / WELL_PROFILES, wells)
            write_parquet(out / TREATMENT_PROFILES, treatments)
    return EmbedResult(emb, wells, treatments, out, how)


def _embed_run(run: Path, data) -> tuple[pd.DataFrame, str]:
    from cellmorph.config import load_config
    from cellmorph.engine.plan import plan_run
    from cellmorph.data.store import build_store, open_store

    cfg = load_config(run / "config.toml")
    plan = plan_run(cfg, data)
    paths = fold_model_paths(run, cfg, plan) if cfg.mode == "finetune" else []  # refused before any image is decoded
    store = build_store(plan.table, cfg.dataset.image_size) if cfg.mode == "finetune" else open_store(plan.table, cfg.dataset.image_size)
    old = json.loads((run / "dataset.json").read_text())
    if old.get("store_key") != store.key:
        raise CellmorphError(
            f"{run}: the run was computed from other data than the dataset found now ({old.get('rows')} rows then, {len(store.index)} now; "
            f"fingerprint {old.get('store_key')} vs {store.key}). Point --data at the data of that run, or run the config again."
        )
    if cfg.mode == "frozen":
        from cellmorph.models.features import extract_features

        feats = extract_features(store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, lambda: plan.device,
                                 stages=cfg.frozen.stage_pooled)
        how = f"frozen {cfg.model.name} (init {cfg.model.init}) pooled features" + (" (8x dihedral TTA)" if cfg.frozen.tta else "") + "; the same for every fold (the backbone is never trained)"
        return embeddings_table(plan.table.df, feats, cfg.model.name), how
    return _embed_folds(cfg, plan, store, paths), f"fine-tuned {cfg.model.name}: each image by the {cfg.evaluation.protocol} fold model that held it out (pooled pre-logit features)"


def fold_model_paths(run: Path, cfg, plan) -> list[Path]:
    """A fine-tuned run's saved fold models (folds/NN/model.pt), one per fold; a clear error when any is missing."""
    from cellmorph.models.factory import FOLD_MODEL

    folder = seed_folder(run, cfg.seed_list[0], cfg.seed_list)
    paths = [fold_folder(folder, i) / FOLD_MODEL for i in range(len(plan.folds))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CellmorphError(
            f"{run}: no saved fold model {missing[0]} ({len(missing)} of {len(paths)} missing). Embedding a fine-tuned run needs every fold's model: "
            "rerun the config with --set finetune.save_models=true (into a new --out)."
        )
    return paths


def _embed_folds(cfg, plan, store, paths: list[Path]) -> pd.DataFrame:
    """Fine-tuned run: each fold's held-out images through that fold's saved model (`paths`, folds/NN/model.pt)."""
    import torch

    from cellmorph.models.factory import load_fold_model, pre_logits
    from cellmorph.models.names import default_input_size
    from cellmorph.models.train import forward_batches, make_input_spec, resize_uint8_stack

    size = cfg.model.input_size or default_input_size(cfg.model.name)
    images = resize_uint8_stack(torch.from_numpy(np.asarray(store.images)), size)
    device = plan.device
    parts = []
    for i, (fold, path) in enumerate(zip(plan.folds, paths)):
        info = json.loads((path.parent / "fold.json").read_text()) if (path.parent / "fold.json").is_file() else {}
        if info.get("held_out") not in (None, fold.name):
            raise CellmorphError(f"{path.parent}/fold.json holds out {info['held_out']!r} but the config's fold {i} is {fold.name!r}: the run does not match its config.")
        model = load_fold_model(cfg.model, path, len(plan.classes), images.shape[1])
        net = pre_logits(model, f"{cfg.model.name} ({path})")
        spec = make_input_spec(model, size, cfg.finetune.normalize, images[torch.from_numpy(fold.train)])
        feats = forward_batches(net, images[torch.from_numpy(fold.test)], spec, device, max(cfg.finetune.batch_size, 64), tta=cfg.finetune.tta).numpy()
        meta = plan.table.df.iloc[fold.test].assign(Metadata_Fold=i, Metadata_Fold_HeldOut=str(fold.name))
        parts.append(embeddings_table(meta, feats, cfg.model.name))
        console.print(f"fold {i + 1}/{len(paths)} ({fold.name}): {len(fold.test)} images embedded")
    emb = pd.concat(parts, ignore_index=True)
    if "Metadata_ImageNumber" in emb.columns:
        emb = emb.sort_values("Metadata_ImageNumber").reset_index(drop=True)
    return emb


def _embed_images(bundle: Path, images, out: Path, execution) -> EmbedResult:
    """New images through a bundle: streamed in shards (engine/screen.py), written at the end (EMBEDDINGS layout)."""
    from cellmorph.data.inputs import match_channels, read_images
    from cellmorph.engine.screen import forget, job_key, score_screen
    from cellmorph.models.classifier import Classifier
    from cellmorph.storage import claim, locked, staged_folder

    clf = Classifier.load(bundle)
    cfg = clf.config
    table = match_channels(read_images(images, cfg.dataset.label), clf)
    with locked(out):
        claim(out, EMBEDDINGS_FOLDER)  # a user's folder is refused, not overwritten
        files = json.loads((bundle / "bundle.json").read_text()).get("files", {})
        resume = job_key("embed", str(out.resolve()), files, cfg.dataset.image_size, table.source)
        feats = score_screen(clf, table, cfg.dataset.image_size, features=True, resume=resume, execution=execution, what="embedding")["features"]
        emb = embeddings_table(table.df, feats, cfg.model.name)
        wells = treatments = None
        if set(WELL_KEYS + [COMPOUND, CONCENTRATION]) <= set(emb.columns):
            wells, treatments = well_and_treatment_profiles(emb)
        with staged_folder(out, EMBEDDINGS_FOLDER) as tmp:  # all the tables or none
            write_parquet(tmp / EMBEDDINGS, emb)
            if wells is not None:
                write_parquet(tmp / WELL_PROFILES, wells)
                write_parquet(tmp / TREATMENT_PROFILES, treatments)
        forget(resume)
    how = f"model bundle {bundle} ({cfg.mode} {cfg.model.name}) on {table.source}: the features its head reads"
    return EmbedResult(emb, wells, treatments, out, how)


def _embed_bundle(bundle: Path, data) -> tuple[pd.DataFrame, str]:
    from cellmorph.models.classifier import Classifier
    from cellmorph.data.catalog import load_dataset

    clf = Classifier.load(bundle)
    cfg = clf.config
    table = load_dataset(cfg.dataset.name, None if data is None else Path(data), label=cfg.dataset.label, **cfg.dataset.options)
    feats = clf.embed(table)
    return embeddings_table(table.df, feats, cfg.model.name), f"model bundle {bundle} ({cfg.mode} {cfg.model.name}): one model for every image"
