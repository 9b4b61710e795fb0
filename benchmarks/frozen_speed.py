"""Frozen feature extraction speed beside a bare timm inference loop, and the logistic head's time
per fold, in one process on the same cores.

    CELLMORPH_DATA=../shared/data python benchmarks/frozen_speed.py [--model tf_efficientnet_lite0] [--batch 32]

Bare loop: `timm.create_model(model, num_classes=0)` in eval mode, weights and a random float input in
channels_last, under inference_mode; the same batch size, input size, image count and torch threads.
cellmorph: `extract_features` on the real BBBC021 subset (uint8 store -> float, resize, normalise,
network), into an empty temporary cache, so it really runs; it includes building the model with its
ImageNet weights. The two alternate `--repeats` times (other load on the machine hits both) and the
best of each is reported, with every measurement. A warm-up batch runs before the first timing.

Head: `logistic_head` (the exact quickstart head: standardise + sklearn L-BFGS, C=1) on the real
features for each leave-one-compound-out fold; `--compare-blas` also times it with the BLAS thread
pool left as it is, `--head-rows N` also on N rows resampled from the real features with small noise
(synthetic: how the head scales to a full-plate-sized training set).

Prints one JSON line. `--device cpu` with a small `--n`, `--size` and `--head-folds` is a smoke run
(what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def bare_loop(model_name: str, batch: int, size: int, n: int, dev: torch.device) -> float:
    """Images/s of a plain timm inference loop over n images (whole and one partial batch, as cellmorph)."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=0).to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitives / cuDNN plans
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            model(x[: min(batch, n - s)]).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def load_subset(data: str | None, n: int):
    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.store import Store, build_store

    table = load_dataset("bbbc021-subset", data)
    store = build_store(table, 0)
    if n and n < len(store.images):
        store = Store(np.ascontiguousarray(store.images[:n]), store.index.iloc[:n].reset_index(drop=True), f"{store.key}-first{n}")
    return table, store


def cellmorph_extract(store, model_name: str, batch: int, size: int, dev: torch.device) -> tuple[float, np.ndarray]:
    from cellmorph.config import ModelConfig
    from cellmorph.models.features import extract_features

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        feats = extract_features(store, ModelConfig(name=model_name, init="imagenet", input_size=size), False, batch, dev, cache=Path(tmp))
        return len(store.images) / (time.perf_counter() - t0), feats


def head_seconds(features: np.ndarray, store, classes: list[str], max_folds: int, blas_default: bool = False) -> tuple[float, int]:
    """Mean seconds per LOCO fold of the quickstart's head; the number of folds timed."""
    from cellmorph.models.features import logistic_head
    from cellmorph.evaluation.splits import leave_one_group_out

    label = "Metadata_MoA"
    y = store.index[label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    # every compound's fold, scorable or not (a smoke run on a few images may leave a class one compound): this only times the head
    folds = [f for f in leave_one_group_out(store.index, "Metadata_Compound") if len(set(y[f.train])) > 1][: max_folds or None]
    if blas_default:  # the head as it was: BLAS keeps its own thread pool (logistic_head's limit made a no-op)
        import threadpoolctl

        orig = threadpoolctl.threadpool_limits
        threadpoolctl.threadpool_limits = lambda *a, **k: orig(limits=None)
        try:
            return head_seconds(features, store, classes, max_folds)
        finally:
            threadpoolctl.threadpool_limits = orig
    t0 = time.perf_counter()
    for i, f in enumerate(folds):
        logistic_head(features, y, f.train, f.test, len(classes), 1.0, None, i)
    return (time.perf_counter() - t0) / max(1, len(folds)), len(folds)


def synthetic_rows(features: np.ndarray, store, rows: int, seed: int = 0):
    """`rows` rows drawn (with replacement) from the real features plus 5%-of-std Gaussian noise; the index
    rows go with them, so the same LOCO folds (now about rows/18 test rows each) apply."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(features), rows)
    f = features[pick] + 0.05 * features.std(0) * rng.standard_normal((rows, features.shape[1])).astype(np.float32)
    from cellmorph.data.store import Store

    return f.astype(np.float32), Store(store.images[:0], store.index.iloc[pick].reset_index(drop=True), "synthetic")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32, help="batch size of both loops (the quickstart's frozen.batch_size)")
    ap.add_argument("--size", type=int, default=0, help="input size; 0 = the model's own (224)")
    ap.add_argument("--n", type=int, default=0, help="images of the real subset to use; 0 = all 660")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (the cores)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timings of each loop; the best is reported")
    ap.add_argument("--head-folds", type=int, default=0, help="LOCO folds to time the head on; 0 = all (18)")
    ap.add_argument("--compare-blas", action="store_true", help="also time the head with BLAS's own thread pool (the old head)")
    ap.add_argument("--head-rows", type=int, default=0, help="also time the head on this many synthetic rows resampled from the real features")
    ap.add_argument("--data", default=None, help="datasets folder (default $CELLMORPH_DATA)")
    args = ap.parse_args(argv)

    from cellmorph.models.factory import default_input_size
    from cellmorph.models.train import pick_device

    dev = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or default_input_size(args.model)
    table, store = load_subset(args.data, args.n)
    n = len(store.images)

    bare, ours, feats = [], [], None
    for _ in range(max(1, args.repeats)):
        bare.append(bare_loop(args.model, args.batch, size, n, dev))
        ips, feats = cellmorph_extract(store, args.model, args.batch, args.size, dev)
        ours.append(ips)
    head_s, n_folds = head_seconds(feats, store, table.classes, args.head_folds)
    line = {
        "benchmark": "frozen_speed",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "model": args.model,
        "batch": args.batch,
        "size": size,
        "images": n,
        "bare_img_s": round(max(bare), 2),
        "cellmorph_img_s": round(max(ours), 2),
        "ratio": round(max(ours) / max(bare), 3),
        "bare_img_s_all": [round(v, 2) for v in bare],
        "cellmorph_img_s_all": [round(v, 2) for v in ours],
        "feature_dim": int(feats.shape[1]),
        "head_folds": n_folds,
        "head_s_per_fold": round(head_s, 3),
    }
    if args.compare_blas:
        line["head_s_per_fold_blas_threaded"] = round(head_seconds(feats, store, table.classes, args.head_folds, blas_default=True)[0], 3)
    if args.head_rows:
        f_syn, s_syn = synthetic_rows(feats, store, args.head_rows)
        line["head_rows_synthetic"] = args.head_rows
        line["head_s_per_fold_synthetic"] = round(head_seconds(f_syn, s_syn, table.classes, args.head_folds)[0], 3)
    print(json.dumps(line))
    sys.stdout.flush()
    return line


if __name__ == "__main__":
    main()
