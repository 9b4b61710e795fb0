"""Predict new plates with a trained model: `cellmorph predict MODEL IMAGES --out DIR`.

MODEL is a bundle folder (bundle.py): a run's final model (RUN/model/, with the run's out-of-fold
predictions as calibration data) or one saved by `Classifier.save`. IMAGES is one of

    a CSV in the folder-dataset format   Image_Path_<Channel> columns (+ any Metadata_*), paths relative to the CSV
    a CellProfiler LoadData CSV          Image_FileName_<Channel> + Image_PathName_<Channel> (+ any Metadata_*)
    a folder of image files              one field of view per file (.png, .tif, .tiff, .jpg), Metadata_FileName

The images are decoded and stored exactly as training stored them (store.build_store with the bundle's
dataset.image_size) and run through the same network code (`Classifier.proba`), so a compound predicted
here gets the probabilities its cross-validation fold gave it (tests/test_predict.py checks this on real
data). Image probabilities are aggregated as in the paper (median: images -> wells -> treatments, where the
input has Metadata_Well / Metadata_Compound + Metadata_Concentration).

Conformal prediction (conformal.py): at each level, the bundle's out-of-fold predictions are aggregated
to units of that level (the calibration units, each scored by a model that never saw its compound) and a
`Calibrator` is fitted on them; each new unit gets a p-value per class, the prediction set at the
confidence `--level` (classes with p-value > 1 - level) and a novelty score; a unit whose set is empty is
flagged "none of the known classes" (none_of_known). A bundle without calibration data predicts without
them and says so (predict.json, report.html).

Distance novelty (`--novelty`, novelty.py): a frozen run's bundle also stores its training units' feature
profiles (reference_profiles.npz). Each new well and treatment gets `distance` (cosine distance of its
standardised backbone-feature profile to the nearest training unit) and `distance_pvalue` (its rank among
the training units' leave-one-compound-out distances); with "combined" (the default when the bundle has
both) none_of_known is "set empty or distance p-value <= 1 - level", and `flagged_by` says which.
Images get their own distance (image_reference.npz, written by `cellmorph run` for frozen and fine-tuned
models, image-only data included): `distance` (cosine distance of the image's features to the nearest of up to
1,000 training images) and `distance_pvalue` (its rank among the training images' leave-one-group-out distances),
computed batch by batch as the images stream; and QC (`qc_std`, `qc_saturated`, `qc_focus`, `qc_flags`: blank,
saturated, out of focus; data/quality.py). Bundles saved outside a run hold no references: softmax, said so in
predict.json, and `--novelty distance` is an error naming how to get them.

DIR receives, all at once (written in a temporary sibling folder and renamed):

    predictions.parquet   per image: Metadata_*, prob_<class>, predicted, probability, and with calibration
                          calibrated_probability (temperature-scaled on the calibration units of the level),
                          pvalue_<class>, prediction_set, set_size, novelty, none_of_known; qc_std, qc_saturated,
                          qc_focus, qc_flags; with an image reference distance, distance_pvalue, flagged_by
                          (wells and treatments, with reference profiles: distance, distance_pvalue, flagged_by)
                          (with --mc-dropout N: prob_<class> is the mean over N passes, mcstd_<class> the std;
                          with --ensemble and MODEL a fine-tuned RUN folder: the mean of its fold models' probabilities)
    wells.csv             per well (input with Metadata_Well), the same columns from the median probabilities
    treatments.csv        per treatment (input with Metadata_Compound and Metadata_Concentration)
    report.html           per unit: prediction, probability, prediction set, novelty flag, 3 thumbnails
    predict.json          the model, the input, the confidence, the calibration per level, images/s
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.evaluation.aggregate import available_levels
from cellmorph.data.table import ImageTable, labelled_mask
from cellmorph.config import ExecutionConfig
from cellmorph.data.quality import FLAG_TEXT as QC_FLAG_TEXT, QC_COLUMNS, qc_flags
from cellmorph.data.stream import field_batches
from cellmorph.evaluation.calibration import fit_temperature, temper
from cellmorph.evaluation.conformal import in_set
from cellmorph.evaluation.novelty import image_score_text
from cellmorph.engine.screen import forget, job_key, score_screen
from cellmorph.data.inputs import match_channels, read_images
from cellmorph.errors import CellmorphError
from cellmorph.progress import console
from cellmorph.storage import PREDICT, claim, locked, seed_folder, staged_folder

PREDICT_FILES = PREDICT.files
MARKER = "predict.json"  # the file that says a folder is a cellmorph predict output


@dataclass
class PlatePrediction:
    """What `predict_images` returns: per image, per well and per treatment tables (None where the input
    lacks the columns), the confidence, and how each level was calibrated."""

    images: pd.DataFrame
    wells: pd.DataFrame | None
    treatments: pd.DataFrame | None
    confidence: float
    classes: list[str]
    label: str
    calibration: dict = field(default_factory=dict)  # level -> Calibrator.describe(), or {"none": reason}
    novelty: dict = field(default_factory=dict)  # level -> which score flags none_of_known there, and the distance score's data
    info: dict = field(default_factory=dict)  # predict.json
    source: tuple | None = field(default=None, repr=False)  # (ImageTable, image_size): where `pixels` decodes images again

    def level(self, name: str) -> pd.DataFrame | None:
        return {"image": self.images, "well": self.wells, "treatment": self.treatments}[name]

    def pixels(self, rows) -> dict[int, np.ndarray]:
        """The decoded uint8 C x H x W images of these image rows (for thumbnails), decoded again from their files:
        a prediction keeps no pixels. Empty when the prediction has no source (made from arrays)."""
        rows = sorted({int(r) for r in rows})
        if self.source is None or not rows:
            return {}
        table, size = self.source
        return {int(r): im for chunk, batch in field_batches(table, size, np.asarray(rows), 32) for r, im in zip(chunk, batch)}


def predict_images(model, images, out: str | Path | None = None, confidence: float = 0.9, *, mc_dropout: int = 0,
                   overwrite: bool = False, novelty: str | None = None, ensemble: bool = False,
                   execution: ExecutionConfig | None = None) -> PlatePrediction:
    """Predict every image of `images` with the bundle `model`; aggregate; conformal sets; write `out`.

    The images are streamed (decoded by threads ahead of the network, one batch in memory at a time) shard by
    shard (a plate, or 2,048 of its fields); with `out`, each finished shard is kept in the cache until the
    output is written, so a killed predict, rerun, resumes with the shards it had (cellmorph.engine.screen).

    Args:
        model: a bundle folder (RUN/model/ of `cellmorph run`, or `Classifier.save`'s) or a loaded `Classifier`.
        images: a folder-format CSV, a CellProfiler LoadData CSV, a folder of image files, or an ImageTable.
        out: the output folder (None: write nothing); an existing one is replaced only when it holds an
            earlier `cellmorph predict` output and overwrite=True.
        confidence: the confidence of the prediction sets (e.g. 0.9: the true class is in the set for at
            least 90% of exchangeable units).
        mc_dropout: N > 0: N Monte Carlo dropout passes (fine-tuned models trained with dropout).
        overwrite: replace an earlier predict output at `out`.
        novelty: the none-of-known flag: "softmax" (empty prediction set), "distance" (the conformal
            p-value of the distance to the bundle's reference profiles <= 1 - confidence) or "combined"
            (either). None: "combined" when the bundle has calibration data and reference profiles,
            "distance" with references only, else "softmax" (see `choose_novelty`).
        ensemble: `model` is a fine-tuned run folder saved with finetune.save_models = true: the mean of
            its fold models' probabilities (folds/NN/model.pt) instead of the final model's.
        execution: where the shards run (`ExecutionConfig(backend="ray", ...)`: one Ray task per shard, the same
            numbers as locally at the same `threads`); None: here.
    Returns:
        A `PlatePrediction` (.images, .wells, .treatments DataFrames).

    Example:
        >>> res = predict_images("runs/quickstart/model", "new_plate/load_data.csv", "runs/plate7", confidence=0.9)
        >>> res.treatments[["Metadata_Compound", "predicted", "prediction_set", "none_of_known"]].head(2)
    """
    if not 0 < confidence < 1:
        raise CellmorphError(f"--level {confidence}: the confidence must lie strictly between 0 and 1, e.g. 0.9.")
    if mc_dropout < 0:
        raise CellmorphError(f"--mc-dropout {mc_dropout}: expected the number of passes, e.g. 20 (0 = off).")
    if execution is not None and execution.backend == "ray":
        from cellmorph.engine.ray_backend import check_ray

        check_ray(execution)
    out = None if out is None else Path(out).expanduser()
    if out is None:
        return _predict(model, images, confidence, mc_dropout, novelty, ensemble, execution, None)
    with locked(out):  # a second predict into the same --out is refused while this one runs
        claim(out, PREDICT, overwrite=overwrite)
        result = _predict(model, images, confidence, mc_dropout, novelty, ensemble, execution, out)
        write_prediction(out, result)
        forget(result.info.get("resume_key"))
    return result


def _predict(model, images, confidence: float, mc_dropout: int, novelty: str | None, ensemble: bool, execution, out) -> PlatePrediction:
    from cellmorph.models.classifier import Classifier

    clf = model if isinstance(model, Classifier) else Classifier.load(_check_model(model))
    if ensemble and mc_dropout:
        raise CellmorphError("--ensemble and --mc-dropout: choose one (the mean over fold models, or over dropout passes of the final model).")
    folds = fold_models(model, clf) if ensemble else []
    label = clf.config.dataset.label
    table = images if isinstance(images, ImageTable) else read_images(images, label)
    table = match_channels(table, clf)
    score = choose_novelty(novelty, clf)
    if mc_dropout and clf.config.mode != "finetune":
        raise CellmorphError(f"--mc-dropout needs a fine-tuned model; {clf.source} is {clf.config.mode} (a logistic head on fixed features).")
    size = clf.config.dataset.image_size
    resume = None
    if out is not None and not isinstance(model, Classifier):  # a bundle on disk: its hash names the job
        bundle = json.loads((_check_model(model) / "bundle.json").read_text()).get("files", {})
        resume = job_key(str(out.resolve()), bundle, size, mc_dropout, [str(f) for f in folds], score, table.source, "qc+image-novelty 1")
    t0 = time.perf_counter()
    from cellmorph.models.factory import load_fold_model

    nets = [load_fold_model(clf.config.model, f, len(clf.classes), clf.channels) for f in folds]
    outs = score_screen(clf, table, size, features=score != "softmax" and clf.reference is not None, mc_dropout=mc_dropout,
                        fold_models=nets, resume=resume, execution=execution, quality=True)
    seconds = time.perf_counter() - t0
    probs, std, features = outs["probs"], outs.get("std"), outs.get("features")
    per_image = {k: v for k, v in outs.items() if k.startswith(("qc_", "image_distance"))}
    result = score_images(table.df, probs, clf, confidence, std=std, features=features, novelty=score, per_image=per_image)
    result.source = (table, size)
    n = len(table.df)
    result.info = {
        "model": str(clf.source).removeprefix("model bundle "), "architecture": clf.config.model.name, "mode": clf.config.mode,
        "init": clf.config.model.init, "classes": clf.classes, "label": label, "input": table.source, "images": int(n),
        "image_shape": [clf.channels, *(clf.trained_on.get("image_shape") or [])], "confidence": confidence,
        "aggregate": clf.config.evaluation.aggregate,
        "levels": [lv for lv in ("image", "well", "treatment") if result.level(lv) is not None],
        "calibration": result.calibration, "mc_dropout": mc_dropout,
        "tta": bool(clf.config.frozen.tta if clf.config.mode == "frozen" else clf.config.finetune.tta and not mc_dropout),
        "seconds_decode_and_predict": round(seconds, 2), "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "execution": {"backend": execution.backend if execution is not None else "local",
                      **({"cpus_per_task": execution.cpus_per_task, "threads": execution.threads or execution.cpus_per_task}
                         if execution is not None and execution.backend == "ray" else {})},
        "novelty_score": score, "none_of_known": _FLAG_TEXT[score].format(c=confidence, a=round(1 - confidence, 6)),
        "novelty": result.novelty, "resume_key": resume,
    }
    if folds:
        result.info["ensemble"] = {"fold_models": [str(f) for f in folds],
                                   "note": ("prob_<class> is the mean of the fold models' probabilities; the conformal p-values compare it "
                                            "with single fold models' out-of-fold scores, so treat them as approximate.")}
    if mc_dropout:
        result.info["mc_dropout_note"] = ("prob_<class> is the mean of the MC dropout passes (mcstd_<class> their std); the conformal "
                                          "p-values compare it with the deterministic out-of-fold scores, so treat them as approximate.")
    return result


_FLAG_TEXT = {
    "softmax": "a unit is flagged when its prediction set at confidence {c} is empty (conformal.py)",
    "distance": ("a unit is flagged when the conformal p-value of its distance to the nearest training unit is <= {a} "
                 "(novelty.py's distance score; wells and treatments only)"),
    "combined": "a unit is flagged when its prediction set at confidence {c} is empty or its distance p-value is <= {a} (novelty.py)",
}
_NO_REFERENCE = ("the bundle holds no well/treatment reference profiles (reference_profiles.npz: written by `cellmorph run` for frozen "
                 "models on data with compounds; not by Classifier.save outside a run, nor by fine-tuned runs): no distance score at this level")


def choose_novelty(requested: str | None, clf) -> str:
    """The novelty score of a prediction: `requested`, checked against what the bundle holds, or by default
    "combined" when it has both calibration data and reference profiles (under `lomo`, frozen
    EfficientNet-Lite0, seed 0, BBBC021 subset treatments, flag at 0.9: AUROC 0.895, 14.5% of known
    compounds flagged, against softmax 0.703 / 7.3% and distance 0.858 / 10.2%: one seed on one dataset),
    "distance" with reference profiles only, else "softmax".

    >>> choose_novelty(None, Classifier.load("runs/quickstart/model"))
    'combined'"""
    from cellmorph.evaluation.novelty import NOVELTY_SCORES

    has_ref = getattr(clf, "reference", None) is not None or getattr(clf, "image_reference", None) is not None
    if requested is None:
        return ("combined" if clf.calibration is not None else "distance") if has_ref else "softmax"
    if requested not in NOVELTY_SCORES:
        raise CellmorphError(f"--novelty {requested}: not a novelty score; use one of {', '.join(NOVELTY_SCORES)}.")
    if requested != "softmax" and not has_ref:
        made = str(clf.trained_on.get("cellmorph_version") or "")
        raise CellmorphError(
            f"--novelty {requested}: {clf.source} holds no distance reference (neither image_reference.npz nor reference_profiles.npz). "
            "`cellmorph run` with save_model = true writes them into RUN/model (frozen and fine-tuned models, image-only data "
            "included); a bundle saved by Classifier.save outside a run, or by a cellmorph older than this one"
            + (f" ({made})" if made else "") + ", has none. Rerun the config with save_model = true into a new --out and predict with "
            "its RUN/model, or use --novelty softmax.")
    if requested != "distance" and clf.calibration is None:
        raise CellmorphError(f"--novelty {requested}: {clf.source} holds no calibration data (calibration.parquet) for prediction sets; "
                             + ("use --novelty distance." if has_ref else "predict without --novelty (no flag is possible)."))
    return requested


def fold_models(run, clf) -> list[Path]:
    """The fold models of a fine-tuned run folder (`--ensemble`): RUN/folds/NN/model.pt (first seed's), every
    fold's, checked against the final model's config; a one-line error naming what is missing otherwise.

    >>> fold_models("runs/finetune", Classifier.load("runs/finetune/model"))
    [PosixPath('runs/finetune/folds/00/model.pt'), PosixPath('runs/finetune/folds/01/model.pt')]"""
    run = Path(run).expanduser() if not hasattr(run, "config") else None
    if run is None or not (run / "model").is_dir():
        raise CellmorphError(f"--ensemble: {run or clf.source} is not a run folder. Pass the run folder (RUN, not RUN/model) of a fine-tune "
                             "run with finetune.save_models = true.")
    cfg = clf.config
    if cfg.mode != "finetune":
        raise CellmorphError(f"--ensemble needs a fine-tuned run; {run} is {cfg.mode} (its fold models are logistic heads, not saved).")
    if cfg.finetune.normalize not in ("imagenet", "raw"):
        raise CellmorphError(f"--ensemble: {run} was fine-tuned with finetune.normalize = {cfg.finetune.normalize!r}, which subtracts each "
                             "fold's training-image mean (not saved with the fold model); ensembles need 'imagenet' or 'raw'.")
    base = seed_folder(run, cfg.seed_list[0], cfg.seed_list)
    folders = sorted(d for d in (base / "folds").glob("[0-9][0-9]") if d.is_dir()) if (base / "folds").is_dir() else []
    missing = [d for d in folders if not (d / "model.pt").is_file()]
    if not folders or missing:
        raise CellmorphError(f"--ensemble: {run} has no saved fold model{f' in {missing[0]}' if missing else 's'}. Rerun the config with "
                             "--set finetune.save_models=true (into a new --out).")
    return [d / "model.pt" for d in folders]


def ensemble_proba(clf, paths: list[Path], x, on_batch=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The mean of the fold models' probabilities of checked images `x`, and each model's: every fold model
    run through the final model's code path (`Classifier.proba`, same input spec) with its own weights.

    >>> mean, per_fold = ensemble_proba(clf, fold_models("runs/finetune", clf), clf.as_images(store.images))"""
    from cellmorph.models.factory import load_fold_model

    per = []
    for path in paths:
        with clf.using(load_fold_model(clf.config.model, path, len(clf.classes), clf.channels)):
            per.append(np.asarray(clf.proba(x, on_batch=on_batch), dtype=np.float64))
    return np.mean(per, axis=0), per


def score_images(df: pd.DataFrame, probs: np.ndarray, clf, confidence: float, std: np.ndarray | None = None,
                 features: np.ndarray | None = None, novelty: str = "softmax", per_image: dict | None = None) -> PlatePrediction:
    """Image rows (Metadata_* of `df`, prob_<class>) -> image, well and treatment tables with conformal
    p-values, sets and novelty calibrated on the bundle's out-of-fold predictions (when it has them), and
    with `novelty` "distance" or "combined" the distance score of each well and treatment from the image
    `features` and the bundle's reference profiles (none_of_known is then that score's flag). `per_image`: the
    streamed per-image numbers (QC: qc_*, image novelty: image_distance, image_distance_pvalue), added to the
    image table with the QC flags and, for "distance"/"combined", the image level's distance flag."""
    from cellmorph.evaluation.conformal import level_table

    classes, label = clf.classes, clf.config.dataset.label
    how = clf.config.evaluation.aggregate
    keep = [c for c in df.columns if c.startswith("Metadata_") or c == label]
    pred = df[keep].reset_index(drop=True).copy()
    for j, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, j].astype(np.float64)
    levels = available_levels(pred)
    cal = clf.calibration
    tables, described = {}, {}
    for level in levels:
        units = pred.copy() if level == "image" else level_table(pred, label, level, how)
        if level == "image":
            units["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
            if std is not None:
                for j, c in enumerate(classes):
                    units[f"mcstd_{c}"] = std[:, j]
        units["probability"] = units[[f"prob_{c}" for c in classes]].max(axis=1)
        if cal is None:
            described[level] = {"none": "the bundle holds no out-of-fold predictions (saved by Classifier.save outside a run): no p-values or prediction sets"}
        elif level not in available_levels(cal):
            described[level] = {"none": f"the calibration data have no {level} level (their columns lack it)"}
        else:
            described[level] = _conformal(units, cal, level, classes, label, how, confidence)
        tables[level] = units
    novelty_info = {}
    for level, units in tables.items():
        if level == "image":
            novelty_info[level] = _image_novelty(units, per_image or {}, clf, novelty, confidence)
        else:
            novelty_info[level] = _distance_novelty(units, pred, features, clf, level, novelty, confidence)
    for level, t in tables.items():  # the label column only where the input carried labels (e.g. reference compounds)
        if label in t.columns and not t[label].notna().any():
            tables[level] = t.drop(columns=[label])
    res = PlatePrediction(tables["image"], tables.get("well"), tables.get("treatment"), confidence, classes, label, described)
    res.novelty = novelty_info
    return res


def _distance_novelty(units: pd.DataFrame, pred: pd.DataFrame, features, clf, level: str, novelty: str, confidence: float) -> dict:
    """Add distance, distance_pvalue, flagged_by and (for "distance"/"combined") the chosen none_of_known
    to `units` (in place); returns what predict.json says about this level's flag."""
    from cellmorph.evaluation.novelty import distance_p_values, reference_distances, unit_profiles

    softmax = "none_of_known" in units.columns
    ref = getattr(clf, "reference", None)
    if novelty == "softmax" or features is None or ref is None:
        why = _NO_REFERENCE if ref is None else "softmax chosen (--novelty softmax)"
        return {"score": "softmax" if softmax else "none", "distance": why}
    if f"{level}_profiles" not in ref:
        if softmax:
            units["flagged_by"] = np.where(units["none_of_known"], "softmax", "")
        return {"score": "softmax" if softmax else "none",
                "distance": f"no {level}-level reference profiles (distance novelty is scored on wells and treatments)"}
    label = clf.config.dataset.label
    src = pred if label in pred.columns else pred.assign(**{label: ""})
    prof = unit_profiles(features, src, level, label, clf.config.evaluation.aggregate)
    dist, cal = reference_distances(ref, level, prof.profiles)
    keys = [c for c in prof.keys.columns if c != label]
    scored = prof.keys[keys].assign(distance=dist, distance_pvalue=distance_p_values(dist, cal))
    merged = units[keys].merge(scored, on=keys, how="left", validate="one_to_one")
    if merged["distance"].isna().any():
        raise CellmorphError("distance novelty: the units do not match their profiles (a bug; please report it).")
    units["distance"], units["distance_pvalue"] = merged["distance"].to_numpy(), merged["distance_pvalue"].to_numpy()
    far = ~in_set(units["distance_pvalue"].to_numpy(), confidence)
    empty = units["none_of_known"].to_numpy(bool) if softmax and novelty == "combined" else np.zeros(len(units), bool)
    units["flagged_by"] = np.select([empty & far, empty, far], ["softmax+distance", "softmax", "distance"], "")
    if softmax and novelty == "combined":
        units["novelty"] = np.maximum(units["novelty"], 1 - units["distance_pvalue"])
    elif not softmax or novelty == "distance":
        units["novelty"] = 1 - units["distance_pvalue"]
    units["none_of_known"] = empty | far
    return {"score": novelty, "reference_units": int(len(ref[f"{level}_profiles"])), "calibration_distances": int(len(cal)),
            "distance": "cosine distance of the unit's standardised frozen-feature profile to the nearest training unit; p-value by rank "
                        "among the training units' leave-one-compound-out distances (novelty.py)"}


def _image_novelty(units: pd.DataFrame, per_image: dict, clf, novelty: str, confidence: float) -> dict:
    """Add the streamed QC numbers, qc_flags ("blank; out_of_focus", "" when the image passes) and, with an image
    reference, image_distance, distance_pvalue and (for "distance"/"combined") the image level's none_of_known and
    flagged_by to the image table `units` (in place); returns what predict.json says about the image level."""
    ref = getattr(clf, "image_reference", None)
    info: dict = {}
    if all(k in per_image for k in QC_COLUMNS):
        for k in QC_COLUMNS:
            units[k] = per_image[k].astype(np.float64)
        focus_min = float(ref["focus_min"]) if ref is not None and "focus_min" in ref else None
        flags = qc_flags(per_image, focus_min)
        units["qc_flags"] = ["; ".join(k for k in flags if flags[k][i]) for i in range(len(units))]
        info["qc"] = {"flags": {k: QC_FLAG_TEXT[k] for k in flags if k != "out_of_focus" or focus_min is not None},
                      "flagged": {k: int(v.sum()) for k, v in flags.items()}, "focus_min": focus_min}
    softmax = "none_of_known" in units.columns
    if ref is None or "image_distance_pvalue" not in per_image:
        return {**info, "score": "softmax" if softmax else "none",
                "distance": "the bundle holds no image reference (image_reference.npz): no image distance score"}
    units["distance"] = per_image["image_distance"].astype(np.float64)
    units["distance_pvalue"] = per_image["image_distance_pvalue"].astype(np.float64)
    if novelty == "softmax":
        return {**info, "score": "softmax" if softmax else "none", "distance": "computed, not used for the flag (--novelty softmax)"}
    far = ~in_set(units["distance_pvalue"].to_numpy(), confidence)
    empty = units["none_of_known"].to_numpy(bool) if softmax and novelty == "combined" else np.zeros(len(units), bool)
    units["flagged_by"] = np.select([empty & far, empty, far], ["softmax+distance", "softmax", "distance"], "")
    units["novelty"] = np.maximum(units["novelty"], 1 - units["distance_pvalue"]) if softmax and novelty == "combined" else 1 - units["distance_pvalue"]
    units["none_of_known"] = empty | far
    return {**info, "score": novelty, "reference_images": int(len(ref["features"])), "calibration_distances": int(len(ref["calibration"])),
            "feature_space": str(ref["feature_space"]), "groups_left_out": str(ref["group_column"]) or "each image", "distance": image_score_text(ref)}


def _conformal(units: pd.DataFrame, cal: pd.DataFrame, level: str, classes: list[str], label: str, how: str, confidence: float) -> dict:
    """Add pvalue_<class>, prediction_set, set_size, novelty and none_of_known to `units` (in place)."""
    from cellmorph.evaluation.conformal import Calibrator, level_table

    cal_units = level_table(cal, label, level, how)
    groups = cal_units["Metadata_Compound"].to_numpy() if "Metadata_Compound" in cal_units.columns else None
    c = Calibrator.fit(cal_units[[f"prob_{k}" for k in classes]].to_numpy(), cal_units[label].to_numpy(), classes, groups=groups)
    probs = units[[f"prob_{k}" for k in classes]].to_numpy()
    p = c.p_values(probs)
    sets = p > 1 - confidence
    for j, k in enumerate(classes):
        units[f"pvalue_{k}"] = p[:, j]
    units["prediction_set"] = ["; ".join(k for k, s in zip(classes, row) if s) for row in sets]
    units["set_size"] = sets.sum(axis=1)
    units["novelty"] = 1 - p.max(axis=1)
    units["none_of_known"] = ~sets.any(axis=1)
    # temperature scaling on the same calibration units: "calibrated_probability" is how often a call this sure was
    # right out of fold (the prediction sets above use the unscaled probabilities; scaling changes no predicted class)
    cal_probs = cal_units[[f"prob_{k}" for k in classes]].to_numpy(dtype=np.float64)
    known = labelled_mask(cal_units, label)
    t = fit_temperature(cal_probs[known], np.array([classes.index(str(v)) for v in cal_units.loc[known, label]]))
    units["calibrated_probability"] = temper(probs, t).max(axis=1)
    return {**c.describe(), "temperature": t}


# --- writing the output folder ------------------------------------------------------------------------


def _check_model(model) -> Path:
    """A clear error for a MODEL that is not a bundle folder (before anything else is read)."""
    from cellmorph.models.bundle import META, REQUIRED_FILES

    path = Path(model).expanduser()
    if path.is_dir() and not (path / META).is_file() and (path / "model" / META).is_file():
        return path / "model"  # a run folder: its final model
    if not path.is_dir():
        raise CellmorphError(f"{path}: no model bundle there (not a folder). Pass a run's model folder (RUN/model) or a folder written by Classifier.save.")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CellmorphError(
            f"{path}: not a cellmorph model bundle (missing {', '.join(missing)}). Pass a run's model folder (RUN/model, written when "
            "save_model = true) or a folder written by Classifier.save."
        )
    return path


def write_prediction(out: Path, result: PlatePrediction) -> Path:
    """Write the output folder whole (built in a temporary sibling and renamed into place: all files or none).
    Call it holding storage.locked(out) after storage.claim(out, PREDICT)."""
    from cellmorph.prediction.report import write_predict_report

    with staged_folder(out, PREDICT) as tmp:
        result.images.to_parquet(tmp / "predictions.parquet", index=False)
        for name, t in (("wells.csv", result.wells), ("treatments.csv", result.treatments)):
            if t is not None:
                t.to_csv(tmp / name, index=False)
        write_predict_report(tmp / "report.html", result)
        (tmp / MARKER).write_text(json.dumps(result.info, indent=2, default=str) + "\n")
    console.print(f"written: {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out
