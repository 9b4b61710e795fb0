"""Frozen transfer: pooled features of a pretrained backbone, extracted once and cached, then a
logistic-regression head per fold (the fast path on a CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cellmorph.config import ModelConfig
from cellmorph.io import write_json, write_npy
from cellmorph.models.names import default_input_size
from cellmorph.progress import console, make_progress
from cellmorph.storage import digest_ok, write_digest
from cellmorph.data.quality import QCTap, cached_store_qc, save_store_qc
from cellmorph.data.store import Store, cache_dir

# 2: extracted through the batch-norm-folded backbone (train.fold_batch_norm; equal to 1's to ~1e-5)
FEATURES_VERSION = 2


def feature_key(store: Store, model_cfg: ModelConfig, tta: bool, stages: bool = False) -> str:
    init = model_cfg.init
    p = Path(init)
    if p.is_file():  # a weights file: its content decides the features
        st = p.stat()
        init = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    blob = json.dumps({"v": FEATURES_VERSION, "store": store.key, "model": model_cfg.name, "init": init, "size": model_cfg.input_size or default_input_size(model_cfg.name), "tta": tta}
                      | ({"stages": True} if stages else {}))  # (last-layer keys unchanged: their caches stay valid)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_features(store: Store, model_cfg: ModelConfig, tta: bool, cache: Path | None = None, stages: bool = False) -> np.ndarray | None:
    """The cached N x D features of this store and backbone, or None (no torch needed to find out). A cache file
    that does not match its recorded content hash (truncated, emptied, bytes changed) or holds NaN is not used:
    the console says so and the features are extracted again."""
    path = (cache or cache_dir()) / "features" / f"{feature_key(store, model_cfg, tta, stages)}.npy"
    if not path.is_file():
        return None
    feats = None
    if digest_ok(path):
        try:
            feats = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            feats = None
    if feats is None or feats.ndim != 2 or len(feats) != len(store.index) or not np.isfinite(feats).all():
        console.print(f"the cached features {path} are damaged (checksum, shape or NaN): extracting them again")
        return None
    return feats


def extract_features(store: Store, model_cfg: ModelConfig, tta: bool, batch_size: int, device, cache: Path | None = None,
                     stages: bool = False) -> np.ndarray:
    """N x D float32 features, from the cache when present, else extracted and cached: the one definition of
    cached-or-extract. `device`: a torch device, or a function returning one, called only when the features must
    be extracted (so a cached frozen run never imports torch). `stages`: frozen.features = "stages" (StagePooled)."""
    hit = cached_features(store, model_cfg, tta, cache, stages)
    if hit is not None:
        return hit
    device = device() if callable(device) else device
    from cellmorph.models.backbone import StagePooled
    from cellmorph.models.factory import create_model, normalization
    from cellmorph.models.train import InputSpec, fold_batch_norm

    path = (cache or cache_dir()) / "features" / f"{feature_key(store, model_cfg, tta, stages)}.npy"
    model = create_model(model_cfg.name, model_cfg.init, num_classes=0, in_chans=store.shape[1])
    mean, std = normalization(model)
    spec = InputSpec(size=model_cfg.input_size or default_input_size(model_cfg.name), mean=mean, std=std)
    what = f"features {model_cfg.name}" + (" + pooled stages" if stages else "") + (" (8x dihedral TTA)" if tta else "")
    batches = QCTap(store.batches(batch_size), store.shape[1])  # every image is decoded here anyway: keep its QC numbers (final model's reference)
    net = fold_batch_norm(model, store.shape[1])
    feats = stream_forward(StagePooled(net) if stages else net, batches, spec, device, len(store.index), what, tta=tta)
    feats = feats.numpy().astype(np.float32)
    write_npy(path, feats, what="cache")
    write_digest(path)
    if cached_store_qc(store) is None:
        save_store_qc(store, batches.result())
    if model_cfg.init not in ("random", "xavier", "gaussian"):  # fixed weights: keep them beside their features
        _write_backbone(path, model, spec)
    return feats


def stream_forward(model, batches, spec, device, total: int, what: str, tta: bool = False, head=None):
    """`model`'s outputs for a stream of (rows, uint8 batch) (`Store.batches`, `stream.field_batches`), in stream
    order, with a progress bar: the batches are decoded by the stream's threads while the network runs. The
    network is put in channels_last once (forward_batches then leaves it so). `head(outputs) -> outputs` is
    applied per batch (e.g. a classifier head on features), so only its outputs accumulate."""
    import torch

    from cellmorph.models.inference import map_batches
    from cellmorph.models.train import forward_batches

    model.to(device).eval().to(memory_format=torch.channels_last)

    def one(item) -> tuple[int, torch.Tensor]:  # a stream batch (on a CPU: in parts of CPU_PART, one after another)
        images = item[1]
        out = forward_batches(model, torch.from_numpy(images), spec, device, len(images), tta=tta)
        return len(images), (out if head is None else head(out))

    outs = []
    with make_progress() as progress:
        task = progress.add_task(what, total=total)
        for n, out in map_batches(one, batches, device):  # on a CPU, one stream batch per core at once
            outs.append(out)
            progress.advance(task, n)
    return torch.cat(outs) if outs else torch.empty(0)


def _write_backbone(features_path: Path, model, spec) -> None:
    """The backbone's weights and input spec beside its cached features, so that a warm frozen run can
    save its final model (a bundle) without importing torch or timm."""
    from safetensors.torch import save

    from cellmorph.io import atomic_path

    with atomic_path(features_path.with_suffix(".backbone.safetensors"), "cache") as tmp:  # bytes written by us: no temporary of safetensors'
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    write_json(features_path.with_suffix(".backbone.json"), {"size": spec.size, "mean": list(spec.mean), "std": list(spec.std), "normalize": spec.normalize_mode}, "cache")
    for f in (features_path.with_suffix(".backbone.safetensors"), features_path.with_suffix(".backbone.json")):
        write_digest(f)


def cached_backbone(store: Store, model_cfg: ModelConfig, tta: bool, cache: Path | None = None, stages: bool = False) -> tuple[dict, dict] | None:
    """The backbone weights (name -> numpy array) and input spec cached with these features, or None."""
    path = (cache or cache_dir()) / "features" / f"{feature_key(store, model_cfg, tta, stages)}.npy"
    weights, spec = path.with_suffix(".backbone.safetensors"), path.with_suffix(".backbone.json")
    if not (weights.is_file() and spec.is_file() and digest_ok(weights) and digest_ok(spec)):
        return None  # not cached, or damaged: the final model is then fitted through the Classifier (which caches it again)
    from safetensors.numpy import load_file

    return load_file(str(weights)), json.loads(spec.read_text())


C_GRID = (0.01, 0.1, 1.0, 10.0)  # frozen.C = "auto" chooses among these (fixed before any run was scored)
FEATURE_SETS = ("last", "stages")  # frozen.features = "auto" chooses between these (the stage-pooled vector's columns)
INNER_FOLDS = 3


def last_width(model_cfg: ModelConfig) -> int:
    """The width of the network's pooled last-layer features: the tail of its stage-pooled vector (StagePooled)."""
    from cellmorph.models.factory import create_model

    return int(create_model(model_cfg.name, "random", num_classes=0).num_features)


def feature_columns(which: str, width: int, tail: int | None) -> slice:
    """The columns of a frozen feature vector of `width` that the head reads, as a slice (views, no copies): every
    one, or with "last" the last `tail` (the pooled last-layer features of a stage-pooled vector)."""
    return slice(width - tail, width) if which == "last" and tail else slice(0, width)


def choose_C(features: np.ndarray, y: np.ndarray, groups: np.ndarray | None, class_weight: str | None, seed: int,
             Cs: tuple[float, ...] = C_GRID, tail: int | None = None) -> dict:
    """frozen.C = "auto" (and frozen.features = "auto"): the C of `Cs` (and, with `tail`, the feature set of
    FEATURE_SETS: the stage-pooled vector, or its last `tail` columns) with the best balanced accuracy over an inner
    3-fold split of these (training) rows, grouped like the outer protocol (whole groups, e.g. compounds or slides,
    when `groups` has 3 or more), else stratified by class; ties go to the smaller C (more regularisation), then to
    "last" (fewer features). Returns the choice and every candidate's inner score, for the run's records.

    >>> choose_C(features[train], y[train], compounds[train], "balanced", 0)["C"]
    1.0"""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    y = np.asarray(y)
    if groups is not None and len(set(np.asarray(groups).astype(str))) >= INNER_FOLDS:
        splits = list(GroupKFold(INNER_FOLDS).split(features, y, np.asarray(groups).astype(str)))
        how = f"{INNER_FOLDS}-fold inner split of whole groups"
    else:
        k = max(2, min(INNER_FOLDS, int(np.bincount(y).min()) if len(y) else 2))
        splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(features, y))
        how = f"{k}-fold stratified inner split"
    n_classes = int(y.max()) + 1
    sets = FEATURE_SETS if tail else (None,)
    scores = {}
    for which in sets:
        cols = feature_columns(which, features.shape[1], tail)
        for C in Cs:
            predicted = np.empty(len(y), dtype=np.int64)
            for train, test in splits:
                predicted[test] = logistic_head(features[:, cols], y, train, test, n_classes, C, class_weight, seed).argmax(1)
            recalls = [float((predicted[y == k] == k).mean()) for k in np.unique(y)]
            scores[(which, C)] = float(np.mean(recalls))
    which, best = max(scores, key=lambda wc: (round(scores[wc], 12), -wc[1], wc[0] == "last"))
    name = (lambda w, c: f"{c:g}") if not tail else (lambda w, c: f"{w} C={c:g}")
    out = {"C": best, "chosen": name(which, best), "inner_balanced_accuracy": {name(w, c): round(v, 4) for (w, c), v in scores.items()},
           "inner_split": how}
    return out | ({"features": which} if tail else {})


def head_C(C: float | str, features: np.ndarray, y: np.ndarray, groups: np.ndarray | None, class_weight: str | None, seed: int,
           features_setting: str = "last", tail: int | None = None) -> tuple[float, slice, dict | None]:
    """The head's C and the feature columns it reads: the configured ones, or with "auto" (frozen.C, frozen.features)
    the inner-validated choice (and its record). `tail`: the last-layer width, needed by frozen.features = "auto"."""
    choose_features = features_setting == "auto"
    if C != "auto" and not choose_features:
        return float(C), slice(0, features.shape[1]), None
    info = choose_C(features, y, groups, class_weight, seed, C_GRID if C == "auto" else (float(C),), tail if choose_features else None)
    return info["C"], feature_columns(info.get("features", "stages"), features.shape[1], tail if choose_features else None), info


def head_groups(df, column: str, idx: np.ndarray) -> np.ndarray | None:
    """The inner split's groups for frozen.C = "auto": the `column` values of rows `idx` (None: no such column)."""
    return df[column].to_numpy()[idx] if column and column in df.columns else None


def fit_logistic_head(features: np.ndarray, y: np.ndarray, C: float, class_weight: str | None, seed: int):
    """Standardisation + multinomial logistic regression fitted on `features`; returns (scaler, classifier).

    BLAS runs on one thread here: the problem is a few small matrix products per L-BFGS step, and a
    threaded BLAS beside torch's OpenMP pool (or any other busy process) spends its time waiting for
    its threads: measured 17x slower on 2 busy cores (benchmarks/frozen_speed.py), same optimum."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        scaler = StandardScaler().fit(features)
        clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=3000, random_state=seed)
        clf.fit(scaler.transform(features), y)
    return scaler, clf


def frozen_head(features: np.ndarray, y: np.ndarray, C: float, cols: slice, class_weight: str | None, seed: int) -> dict[str, np.ndarray]:
    """The standardised logistic head of a Classifier or bundle (mean, scale, coef, intercept; classes x width),
    fitted on the columns `cols` and laid out over the full feature width: unread columns get mean 0, scale 1 and
    coefficient 0, so one network (the stage-pooled one) serves a head that reads only its last-layer features.
    sklearn's binary head (one row, for class 1) becomes two rows (softmax over (0, z) is its sigmoid)."""
    scaler, head = fit_logistic_head(features[:, cols], y, C, class_weight, seed)
    coef, intercept = head.coef_, head.intercept_
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    width = features.shape[1]
    mean, scale, full = np.zeros(width), np.ones(width), np.zeros((coef.shape[0], width))
    mean[cols], scale[cols], full[:, cols] = scaler.mean_, scaler.scale_, coef
    return {"mean": mean, "scale": scale, "coef": full, "intercept": np.asarray(intercept, dtype=np.float64)}


def logistic_head(features: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, n_classes: int, C: float, class_weight: str | None, seed: int) -> np.ndarray:
    """Fit the head on `train`; class probabilities for `test` in 0..n_classes-1 order (a class missing
    from training gets probability 0)."""
    from threadpoolctl import threadpool_limits

    scaler, clf = fit_logistic_head(features[train], y[train], C, class_weight, seed)
    probs = np.zeros((len(test), n_classes))
    with threadpool_limits(limits=1, user_api="blas"):
        probs[:, clf.classes_] = clf.predict_proba(scaler.transform(features[test]))
    return probs
