"""Development check of image-novelty distance variants on DEV kinds only (never the kinds of image_novelty.py):
smooth gradients, checkerboards, heavily blurred held-out images and a dev foreign source (BBBC021 model: whole-tissue
H&E crops; nuclei model: crops of the raw BBBC021 DAPI field). Written after image_novelty.py's first results (cosine
on standardised features) were seen, to choose a variant without looking at the test kinds again.

    python benchmarks/image_novelty_dev.py --bundle BUNDLE --data DIR [--seeds 100,101,102]

Variants (each with the same leave-one-group-out calibration, k = 1):
  cosine_std   cosine distance of features standardised with the reference's mean and deviation (the shipped score)
  euclid_std   Euclidean distance of the same standardised features (keeps the magnitude cosine discards)
  cosine_raw   cosine distance of the raw features (Deep kNN style: L2-normalised penultimate features)
  cosine_raw+intensity   cosine_raw combined with the Euclidean kNN distance of the images' intensity profiles
               (data.quality.intensity_profile) by novelty.combined_scores (added 2026-12-06, after the test
               benchmark had shown foreign translocation fields at AUROC 0.904 on the nuclei bundle; chosen here, on
               dev kinds, before the test benchmark was run again)
Prints one JSON line: the dev AUROC (against held-out real images) per variant and kind, mean over seeds, and the
false-flag rate at 0.9 per variant.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

import cellmorph as cm
from cellmorph.data.stream import field_batches
from cellmorph.data.quality import intensity_profile
from cellmorph.evaluation.novelty import distance_p_values, image_distances, image_group_column, image_reference, reference_sample

from image_novelty import MAX_TEST, resize_to  # noqa: E402 - the benchmark's own helpers (same folder)


def variant_distances(name: str, ref: np.ndarray, groups: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = ref.astype(np.float64)
    test = test.astype(np.float64)
    if name.endswith("_std"):
        mu, sd = ref.mean(axis=0), ref.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        ref, test = (ref - mu) / sd, (test - mu) / sd
    if name.startswith("cosine"):
        def norm(x):
            n = np.linalg.norm(x, axis=1, keepdims=True)
            return x / np.where(n > 0, n, 1.0)
        r, t = norm(ref), norm(test)
        sim = r @ r.T
        sim[groups[:, None] == groups[None, :]] = -np.inf
        return 1 - (t @ r.T).max(axis=1), 1 - sim.max(axis=1)
    sq_r = (ref ** 2).sum(axis=1)
    d_rr = np.sqrt(np.maximum(sq_r[:, None] + sq_r[None, :] - 2 * ref @ ref.T, 0))
    d_rr[groups[:, None] == groups[None, :]] = np.inf
    d_tr = np.sqrt(np.maximum((test ** 2).sum(axis=1)[:, None] + sq_r[None, :] - 2 * test @ ref.T, 0))
    return d_tr.min(axis=1), d_rr.min(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=os.environ.get("CELLMORPH_DATA", "../shared/data"))
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    data = Path(args.data)
    clf = cm.Classifier.load(args.bundle)
    cfg = clf.config
    table = cm.load_dataset(cfg.dataset.name, data, label=cfg.dataset.label, **dict(cfg.dataset.options or {}))
    size = cfg.dataset.image_size
    labelled = np.flatnonzero(table.df[table.label].notna().to_numpy())
    groups = table.df[image_group_column(table.df)].astype(str).to_numpy()

    def feats(batches):
        return clf.outputs(batches, features=True)["features"]

    def feats_profiles(batches):
        out = clf.outputs(batches, features=True, per_batch=lambda im, _, __: {"profile": intensity_profile(im)})
        return out["features"].astype(np.float16), out["profile"]

    shape = next(field_batches(table, size, labelled[:1], 1))[1].shape[1:]
    c, h, w = shape
    variants = ("cosine_std", "euclid_std", "cosine_raw", "cosine_raw+intensity")
    res = {v: {} for v in variants}
    ffr = {v: [] for v in variants}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        names = np.array(sorted(set(groups[labelled])))
        held = list(rng.permutation(names)[: len(names) // 3])
        train = labelled[~np.isin(groups[labelled], held)]
        test = labelled[np.isin(groups[labelled], held)]
        test = np.sort(rng.choice(test, min(MAX_TEST, len(test)), replace=False))
        ref_rows = train[reference_sample(len(train), seed)]
        f_ref, p_ref = feats_profiles(field_batches(table, size, ref_rows, clf.batch_size))
        f_test, p_test = feats_profiles(field_batches(table, size, test, clf.batch_size))
        combined_ref = image_reference(f_ref, groups[ref_rows], "", "dev", profiles=p_ref)
        real = np.concatenate([b for _, b in field_batches(table, size, test[: args.n], args.n)])
        yy, xx = np.mgrid[0:h, 0:w]
        kinds = {
            "gradient": np.stack([np.stack([(rng.uniform(0, 255) * (xx * np.cos(a) + yy * np.sin(a)) / max(h, w) % 256) for _ in range(c)])
                                  for a in rng.uniform(0, np.pi, args.n)]).astype(np.uint8),
            "checkerboard": np.stack([np.broadcast_to(((xx // k + yy // k) % 2 * 255)[None], shape) for k in rng.integers(2, max(3, h // 4), args.n)]).astype(np.uint8),
            "blurred": np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0) if c == 3 else im[0]).filter(ImageFilter.GaussianBlur(max(2, h // 32)))).reshape(h, w, -1).transpose(2, 0, 1)
                                 for im in real]),
        }
        if cfg.dataset.name == "crchisto":
            dapi = np.asarray(Image.open(sorted(glob.glob(str(data / "bbbc021-raw-sample" / "**" / "*.tif"), recursive=True))[0]))
            dapi = np.clip(dapi.astype(np.float64) / np.percentile(dapi, 99.5) * 255, 0, 255).astype(np.uint8)
            ys, xs = rng.integers(0, dapi.shape[0] - 64, args.n), rng.integers(0, dapi.shape[1] - 64, args.n)
            crops = np.stack([np.stack([np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8), dapi[y:y + 64, x:x + 64]]) for y, x in zip(ys, xs)])
            kinds["foreign_dev"] = resize_to(crops, shape)
        else:
            files = sorted(glob.glob(str(data / "crchistophenotypes" / "img*" / "img*.png")))
            crops = []
            for f in rng.choice(files, args.n):
                im = np.asarray(Image.open(f).convert("RGB"))
                y, x = rng.integers(0, im.shape[0] - 256), rng.integers(0, im.shape[1] - 256)
                crops.append(im[y:y + 256, x:x + 256].transpose(2, 0, 1))
            kinds["foreign_dev"] = resize_to(np.stack(crops), shape)
        for v in variants:
            if v == "cosine_raw+intensity":  # the library's combined score; ranked by 1 - p (ties count half)
                _, p0 = image_distances(combined_ref, f_test, p_test)
                ffr[v].append(float((p0 <= 0.1).mean()))
                for k, pix in kinds.items():
                    _, p = image_distances(combined_ref, *feats_profiles([(np.arange(len(pix)), pix)]))
                    res[v].setdefault(k, []).append(float(roc_auc_score(np.r_[np.zeros(len(p0)), np.ones(len(p))], -np.r_[p0, p])))
                continue
            d0, cal = variant_distances(v, f_ref, groups[ref_rows], f_test)
            ffr[v].append(float((distance_p_values(d0, cal) <= 0.1).mean()))
            for k, pix in kinds.items():
                d, _ = variant_distances(v, f_ref, groups[ref_rows], feats([(np.arange(len(pix)), pix)]).astype(np.float16))
                res[v].setdefault(k, []).append(float(roc_auc_score(np.r_[np.zeros(len(d0)), np.ones(len(d))], np.r_[d0, d])))
    out = {"benchmark": "image_novelty_dev", "dataset": cfg.dataset.name, "seeds": args.seeds,
           "auroc": {v: {k: round(float(np.mean(x)), 4) for k, x in r.items()} for v, r in res.items()},
           "auroc_mean_over_kinds": {v: round(float(np.mean([np.mean(x) for x in r.values()])), 4) for v, r in res.items()},
           "false_flag_rate": {v: round(float(np.mean(x)), 4) for v, x in ffr.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
