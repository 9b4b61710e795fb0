"""Model bundles: a trained classifier as a self-contained folder.

    model.safetensors   every tensor the classifier needs: the network's state dict (finetune), or the
                        backbone's (keys "backbone.*") and the logistic head's (keys "head.*") (frozen);
                        loading never needs a weights package or a download
    bundle.json         format_version, cellmorph version, mode, model, init, classes, label column,
                        input spec (channels, size, mean, std, normalize), the preprocessing expected,
                        what it was trained on, created time, and `files`: the sha256 of every other file of
                        the bundle (a missing, changed or foreign file is refused, naming it); the class
                        order and label are also stamped into model.safetensors' header metadata, and the
                        calibration's prob_<class> columns must be the classes in order
    config.toml         the resolved config it was trained with (every default written out)
    calibration.parquet (optional; format 2) the out-of-fold predictions of the cross-validation that
                        produced the bundle (`cellmorph run`, RUN/model/): one row per labelled image,
                        Metadata_*, the label column, prob_<class>; each compound scored by a fold model
                        that never saw it, so `cellmorph predict` calibrates conformal p-values on them.
                        A bundle saved by `Classifier.save` outside a run has none.
    reference_profiles.npz (optional) the distance novelty score's reference (novelty.reference_profiles):
                        the training units' raw well and treatment feature profiles, their compounds,
                        and per compound the image count, feature sum and sum of squares. Written by
                        `cellmorph run` for frozen models; about 2.6 MB on the BBBC021 subset.
    image_reference.npz (optional) the image novelty score's reference (novelty.image_reference): up to 1,000
                        training images' features (float16; the frozen backbone's, or a fine-tuned network's
                        pre-logits), the distance metric, groups, leave-one-group-out calibration distances
                        and the out-of-focus threshold; its own `version` (IMAGE_REFERENCE_VERSION: a newer one is
                        refused, naming the file) and a feature width checked against the network on load.
                        Written by `cellmorph run` (save_model = true) for frozen and fine-tuned models; about
                        1.7 MB on the BBBC021 subset.

Format 2 adds the optional calibration.parquet; format 1 bundles (none) load unchanged. The optional
reference_profiles.npz keeps format 2: a reader that does not know it predicts without it. An older
cellmorph refuses a format 2 bundle with its "made by a newer cellmorph" error.

A bundle is written into a temporary sibling folder and renamed into place (cellmorph.storage), so a killed
save leaves the old bundle or the new one, never half of either. Only folders holding nothing but these files
are ever replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.version import __version__
from cellmorph.config import ExperimentConfig, dump_toml, parse_config, read_toml
from cellmorph.errors import CellmorphError
from cellmorph.storage import BUNDLE, claim, locked, staged_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT_VERSION = 2
IMAGE_REFERENCE_VERSION = 2  # image_reference.npz's own version (its keys: novelty.image_reference; 2 adds intensity profiles)
IMAGE_REFERENCE_KEYS = ("version", "metric", "features", "groups", "calibration", "group_column", "feature_space", "n_training")
IMAGE_METRICS = ("cosine_raw",)  # distances this cellmorph computes for image_reference.npz (novelty.IMAGE_METRIC)
WEIGHTS, META, CONFIG, CALIBRATION, REFERENCE, IMAGE_REFERENCE = BUNDLE.files  # REFERENCE: the training units' feature profiles (distance novelty)
REQUIRED_FILES = (WEIGHTS, META, CONFIG)
META_FIELDS = ("mode", "model", "init", "classes", "label", "input")
INPUT_FIELDS = ("channels", "size", "mean", "std", "normalize")


@dataclass
class Bundle:
    """A bundle as read from disk: its tensors, bundle.json and config, checked against each other."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict
    config: ExperimentConfig
    calibration: pd.DataFrame | None = None  # out-of-fold predictions (calibration.parquet), when the bundle has them
    reference: dict[str, np.ndarray] | None = None  # reference_profiles.npz (novelty.reference_profiles), when present
    image_reference: dict[str, np.ndarray] | None = None  # image_reference.npz (novelty.image_reference), when present


def save_bundle(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, cfg: ExperimentConfig, overwrite: bool = False,
                calibration: pd.DataFrame | None = None, reference: dict[str, np.ndarray] | None = None,
                image_reference: dict[str, np.ndarray] | None = None) -> Path:
    """Write a bundle folder atomically.

    Args:
        path: the bundle folder to create.
        tensors: name -> tensor (any device; saved as contiguous CPU copies), or name -> numpy array
            (all of them: then torch is not imported, e.g. a frozen model from cached backbone weights).
        meta: the bundle.json fields of META_FIELDS (format_version, version and time are added here).
        cfg: the resolved config, written as config.toml.
        overwrite: replace an existing bundle at `path` (never a folder holding anything else).
        calibration: out-of-fold predictions to store as calibration.parquet (None: none).
        reference: novelty.reference_profiles of the training rows, stored as reference_profiles.npz (None: none).
        image_reference: novelty.image_reference of the training images, stored as image_reference.npz (None: none).
    Returns:
        The bundle folder.

    Example:
        >>> save_bundle("moa-model", {"w": torch.zeros(2)}, meta, cfg)
        PosixPath('moa-model')
    """
    path = Path(path).expanduser()
    # The class order and label travel inside the weights file too: bundle.json cannot be edited to disagree.
    # (one metadata key: safetensors writes its metadata map in no fixed order, and the bytes must be reproducible)
    stamp = {"cellmorph": json.dumps({"classes": list(meta.get("classes", [])), "label": str(meta.get("label", ""))})}
    if all(isinstance(v, np.ndarray) for v in tensors.values()):  # the frozen fast path: no torch needed
        from safetensors.numpy import save

        weights = save({k: np.require(v, requirements="C") for k, v in tensors.items()}, metadata=stamp)  # (not ascontiguousarray: it makes 0-d arrays 1-d)
    else:
        from safetensors.torch import save

        weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=stamp)
    with locked(path, "bundle"):
        if path.exists() and path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty folder holds nothing to lose
        claim(path, BUNDLE, "cannot save a bundle to", overwrite=overwrite)
        with staged_folder(path, BUNDLE, "bundle") as tmp:
            (tmp / WEIGHTS).write_bytes(weights)  # written by us: no temporary of safetensors' own can be left behind
            (tmp / CONFIG).write_text(dump_toml(cfg) + "\n")
            if calibration is not None:
                calibration.to_parquet(tmp / CALIBRATION, index=False)
            if reference is not None:
                np.savez(tmp / REFERENCE, **reference)
            if image_reference is not None:
                np.savez(tmp / IMAGE_REFERENCE, **image_reference)
            files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}  # bundle.json ties every other file to this bundle
            full = {"format_version": FORMAT_VERSION, "cellmorph_version": __version__, **meta,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
            (tmp / META).write_text(json.dumps(full, indent=2) + "\n")
    return path


def bundle_meta(cfg: ExperimentConfig, classes: list[str], channels: int, size: int, mean, std, normalize: str, trained_on: dict,
                calibration_info: dict | None = None, calibration_rows: int = 0) -> dict:
    """The bundle.json fields (META_FIELDS and what the bundle was trained on) of a fitted classifier."""
    meta = {
        "mode": cfg.mode, "model": cfg.model.name, "init": cfg.model.init, "classes": list(classes), "label": cfg.dataset.label,
        "input": {"channels": int(channels), "size": int(size), "mean": [float(x) for x in mean], "std": [float(x) for x in std], "normalize": normalize},
        "preprocessing": f"uint8 N x C x H x W, as cellmorph's store (dataset.image_size = {cfg.dataset.image_size})",
        "trained_on": trained_on,
    }
    if calibration_info is not None:
        meta["calibration"] = {**calibration_info, "rows": int(calibration_rows)}
    return meta


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle folder.

    Args:
        path: the bundle folder (as written by `save_bundle`).
    Returns:
        The `Bundle`: tensors on the CPU, bundle.json and the validated config.
    Raises:
        CellmorphError naming the folder and the file or field at fault: missing files, corrupt JSON,
        a newer or unknown format_version, missing fields, a config that disagrees with bundle.json,
        an unreadable model.safetensors.

    Example:
        >>> b = load_bundle("moa-model")
        >>> b.meta["classes"][:2]
        ['Aurora kinase inhibitors', 'Cholesterol-lowering']
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CellmorphError(f"no model bundle at {path}: not a folder. Pass the folder that Classifier.save wrote.")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CellmorphError(f"{path}: not a complete model bundle, missing {', '.join(missing)}. Save the model again (Classifier.save).")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CellmorphError(f"{path / META}: corrupt, not valid JSON ({err}). Save the model again.") from None
    if not isinstance(meta, dict):
        raise CellmorphError(f"{path / META}: corrupt, expected a JSON object. Save the model again.")
    _check_meta(path / META, meta)
    _check_files(path, meta)
    cfg = parse_config(read_toml(path / CONFIG), path / CONFIG)
    for field, value in (("mode", cfg.mode), ("model", cfg.model.name)):
        if meta[field] != value:
            raise CellmorphError(f"{path}: bundle.json says {field} = {meta[field]!r} but config.toml says {value!r}; the bundle was edited by hand. Save the model again.")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path / WEIGHTS))
        stamp = _weights_metadata(path / WEIGHTS)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same fix
        raise CellmorphError(f"{path / WEIGHTS}: cannot read the weights ({type(err).__name__}: {err}). Save the model again.") from None
    stamped = json.loads(stamp["cellmorph"]).get("classes") if "cellmorph" in stamp else None
    if stamped is not None and stamped != list(meta["classes"]):
        raise CellmorphError(f"{path / META}: field 'classes' {meta['classes']} is not the class order the weights were trained with "
                             f"({stamped}, recorded in {WEIGHTS}): bundle.json was edited. Save the model again.")
    calibration = None
    if (path / CALIBRATION).is_file():
        try:
            calibration = pd.read_parquet(path / CALIBRATION)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same fix
            raise CellmorphError(f"{path / CALIBRATION}: cannot read the calibration data ({type(err).__name__}: {err}). Run the experiment again to rewrite the bundle.") from None
        cols = [c.removeprefix("prob_") for c in calibration.columns if c.startswith("prob_")]
        if cols != list(meta["classes"]):
            raise CellmorphError(f"{path / CALIBRATION}: its probability columns {cols} are not the bundle's classes {meta['classes']} in order: "
                                 "calibration data of another model. Run the experiment again to rewrite the bundle.")
    elif (meta.get("calibration") or {}).get("rows"):
        raise CellmorphError(f"{path / CALIBRATION}: missing, but {META} says the bundle was saved with {meta['calibration']['rows']} rows of "
                             "calibration data. Restore the file, or run the experiment again to rewrite the bundle.")
    reference = None
    if (path / REFERENCE).is_file():
        try:
            with np.load(path / REFERENCE, allow_pickle=False) as z:
                reference = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same fix
            raise CellmorphError(f"{path / REFERENCE}: cannot read the reference profiles ({type(err).__name__}: {err}). Run the experiment again to rewrite the bundle.") from None
    image_reference = _read_image_reference(path / IMAGE_REFERENCE) if (path / IMAGE_REFERENCE).is_file() else None
    return Bundle(path, tensors, meta, cfg, calibration, reference, image_reference)


def _read_image_reference(path: Path) -> dict[str, np.ndarray]:
    """image_reference.npz, checked: readable, this cellmorph's version, every key, consistent shapes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same fix
        raise CellmorphError(f"{path}: cannot read the image reference ({type(err).__name__}: {err}). Run the experiment again to rewrite the bundle.") from None
    version = int(ref["version"]) if "version" in ref and ref["version"].shape == () else None
    if version is None or version < 1:
        raise CellmorphError(f"{path}: no valid 'version' (expected {IMAGE_REFERENCE_VERSION}). Run the experiment again to rewrite the bundle.")
    if version > IMAGE_REFERENCE_VERSION:
        raise CellmorphError(f"{path}: image reference version {version}, made by a newer cellmorph (this is {__version__}, reading "
                             f"version {IMAGE_REFERENCE_VERSION}); upgrade cellmorph to load it.")
    missing = [k for k in IMAGE_REFERENCE_KEYS if k not in ref]
    f = ref.get("features")
    if missing or f is None or f.ndim != 2 or len(ref["groups"]) != len(f) or len(ref["calibration"]) != len(f) \
            or str(ref["metric"]) not in IMAGE_METRICS:
        raise CellmorphError(f"{path}: damaged image reference (missing {missing}, or arrays of inconsistent shapes). "
                             "Run the experiment again to rewrite the bundle.")
    prof = ref.get("profiles")
    if version >= 2 and prof is not None and (prof.ndim != 2 or len(prof) != len(f) or len(ref.get("profile_calibration", ())) != len(f)
                                               or len(ref.get("combined_calibration", ())) != len(f)):
        raise CellmorphError(f"{path}: damaged image reference (intensity profiles of inconsistent shapes). Run the experiment again to rewrite the bundle.")
    return ref


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_files(path: Path, meta: dict) -> None:
    """Every file of the bundle is the one bundle.json recorded (sha256): none missing, none changed, none added.
    Bundles saved before checksums were recorded (no `files` field) are read as they are."""
    files = meta.get("files")
    if files is None:
        return
    present = {f.name for f in path.iterdir() if f.is_file() and f.name != META}
    for name in sorted(set(files) - present):
        raise CellmorphError(f"{path / name}: missing, but {META} lists it (sha256 {files[name][:12]}...). Restore the file, or save the model again.")
    for name in sorted(present & set(BUNDLE.files) - set(files)):
        raise CellmorphError(f"{path / name}: not part of this bundle ({META} does not list it): a file from another bundle? Remove it, or save the model again.")
    for name in sorted(files):
        if sha256_file(path / name) != files[name]:
            raise CellmorphError(f"{path / name}: does not match the checksum {META} recorded: the file was changed or comes from another bundle. "
                                 "Restore it, or save the model again.")


def _weights_metadata(path: Path) -> dict:
    """The metadata cellmorph stamped into model.safetensors' header (classes, label); {} for older bundles."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError(f"header length {n}")
        return json.loads(f.read(n)).get("__metadata__") or {}


def _check_meta(where: Path, meta: dict) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CellmorphError(f"{where}: field 'format_version' = {version!r} is not a bundle format this cellmorph knows (it reads 1 to {FORMAT_VERSION}).")
    if version > FORMAT_VERSION:
        raise CellmorphError(
            f"{where}: field 'format_version' = {version}: made by a newer cellmorph {meta.get('cellmorph_version', '?')} "
            f"(this is {__version__}, reading format {FORMAT_VERSION}); upgrade cellmorph to load it."
        )
    missing = [f for f in META_FIELDS if f not in meta] + [f"input.{f}" for f in INPUT_FIELDS if f not in (meta.get("input") or {})]
    if missing:
        raise CellmorphError(f"{where}: missing field(s) {', '.join(missing)}. Save the model again.")
    if meta["mode"] not in ("frozen", "finetune"):
        raise CellmorphError(f"{where}: field 'mode' = {meta['mode']!r}: expected 'frozen' or 'finetune'.")
    if not (isinstance(meta["classes"], list) and len(meta["classes"]) >= 2):
        raise CellmorphError(f"{where}: field 'classes' = {meta['classes']!r}: expected a list of at least 2 class names.")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `model` strictly, or say which keys and shapes do not fit the architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CellmorphError(
            f"{where}: the weights do not fit the architecture (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape (saved vs architecture) {shapes[:5]}). The bundle is damaged or its bundle.json was edited; save the model again."
        )
    model.load_state_dict(state, strict=True)
