"""Image-level "none of the known" and QC on garbage: AUROC of flagging blank, noise, colour-inverted and
foreign-dataset images against held-out real images, and the false-flag rate of real held-out images at 0.9.

    python benchmarks/image_novelty.py --bundle BUNDLE --data DIR [--seeds 0,1,2] [--n 30]

BUNDLE: a bundle folder (RUN/model of `cellmorph run` with save_model = true): its network gives the features
(frozen backbone, or a fine-tuned network's pre-logits), its config the dataset. Protocol, per seed:
  - the dataset's groups (Metadata_Compound for BBBC021, the source H&E image for nuclei) are split at random,
    a third held out; the image reference is built from the TRAINING groups' images exactly as the bundle's
    (`novelty.image_reference`: at most 1,000 images, seeded sample; calibration leave-one-group-out); the held-out
    groups' images (at most 1,000) are the real negatives: truly held out, never in the reference or calibration;
  - N images of each kind are made with the seed: blank (flat grey, flat colour, flat + noise of std 0.5),
    noise (uniform, Gaussian around grey, Gaussian with the real images' per-channel mean and std),
    inverted (255 - a held-out real image), and two foreign datasets resized to the model's store shape
    (BBBC021 model: CRCHistoPhenotypes nucleus patches, BBBC013 translocation fields; nuclei model: BBBC021
    subset fields, BBBC013 fields);
  - scores: "distance" (the cosine kNN distance of the features alone; AUROC is rank-based so it equals
    that of 1 - p-value up to ties), "combined" (the shipped score since 2026-12-06: novelty.image_distances with
    the images' intensity profiles, ranked by 1 - p-value, ties counted half) and "combined_or_qc" (combined, with
    any QC flag ranked above every unflagged image); flags at 0.9: p-value <= 0.1, and that or a QC flag.
Nothing here is tuned: the score, the QC thresholds and the flag level were fixed before this was run.
Also, where the data have at most 50 groups, the false-flag rate leave-one-group-out (each compound held out once,
against a reference of all the others). Prints one JSON line: per kind the AUROC and flag rate (mean, sd over seeds,
per seed), the false-flag rates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

import cellmorph as cm
from cellmorph.data.quality import QC_COLUMNS, image_numbers, qc_flags
from cellmorph.data.stream import field_batches
from cellmorph.evaluation.novelty import image_distances, image_group_column, image_reference, reference_sample

MAX_TEST = 1000
LOCO_MAX_GROUPS = 50  # leave-one-group-out false flags for datasets with at most this many groups (BBBC021: 18 compounds)


def resize_to(images: np.ndarray, shape: tuple) -> np.ndarray:
    """uint8 N x C x H x W -> N x shape (channels: first 3, or padded with zeros), resized with PIL's bilinear."""
    c, h, w = shape
    out = np.zeros((len(images), c, h, w), np.uint8)
    for i, im in enumerate(images):
        for k in range(min(c, im.shape[0])):
            out[i, k] = np.asarray(Image.fromarray(im[k]).resize((w, h), Image.Resampling.BILINEAR))
    return out


def translocation(data: Path, n: int, rng) -> np.ndarray:
    """BBBC013 fields: GFP as green, DNA as blue (C x 640 x 640)."""
    gfp = sorted(glob.glob(str(data / "bbbc013" / "Channel1-*.tif")))
    pick = rng.choice(len(gfp), n, replace=len(gfp) < n)
    out = []
    for i in pick:
        g = np.asarray(Image.open(gfp[i]))
        d = np.asarray(Image.open(gfp[i].replace("Channel1-", "Channel2-")))
        out.append(np.stack([np.zeros_like(g), g, d]).astype(np.uint8))
    return np.stack(out)


def nucleus_patches(data: Path, n: int, rng) -> np.ndarray:
    table = cm.load_dataset("crchisto", data, label="Metadata_Label", patch_size=32)
    rows = np.sort(rng.choice(len(table.df), n, replace=False))
    return np.concatenate([b for _, b in field_batches(table, 0, rows, 64)])


def bbbc021_fields(data: Path, n: int, rng) -> np.ndarray:
    files = sorted(glob.glob(str(data / "bbbc021-subset" / "images" / "*.png")))
    return np.stack([np.asarray(Image.open(files[i]).convert("RGB")).transpose(2, 0, 1) for i in rng.choice(len(files), n, replace=False)])


def synthetic(kind: str, n: int, shape: tuple, rng, real: np.ndarray) -> np.ndarray:
    c, h, w = shape
    k = n // 3
    if kind == "blank":
        grey = np.stack([np.full(shape, rng.integers(0, 256), np.uint8) for _ in range(k)])
        colour = np.stack([np.broadcast_to(rng.integers(0, 256, (c, 1, 1)), shape).astype(np.uint8) for _ in range(k)])
        level = rng.integers(10, 245, (n - 2 * k, 1, 1, 1))
        near = np.clip(np.rint(level + rng.normal(0, 0.5, (n - 2 * k, *shape))), 0, 255).astype(np.uint8)
        return np.concatenate([grey, colour, near])
    if kind == "noise":
        uniform = rng.integers(0, 256, (k, *shape), dtype=np.uint8)
        gauss = np.clip(np.rint(rng.normal(128, 40, (k, *shape))), 0, 255).astype(np.uint8)
        mu = real.reshape(len(real), c, -1).mean(axis=(0, 2))[:, None, None]
        sd = real.reshape(len(real), c, -1).std(axis=2).mean(axis=0)[:, None, None]
        like = np.clip(np.rint(rng.normal(mu, sd, (n - 2 * k, *shape))), 0, 255).astype(np.uint8)
        return np.concatenate([uniform, gauss, like])
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=os.environ.get("CELLMORPH_DATA", "../shared/data"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=30, help="images per kind and seed")
    args = ap.parse_args()
    t0 = time.time()
    data = Path(args.data)
    clf = cm.Classifier.load(args.bundle)
    cfg = clf.config
    opts = dict(cfg.dataset.options or {})
    table = cm.load_dataset(cfg.dataset.name, data, label=cfg.dataset.label, **opts)
    size = cfg.dataset.image_size
    labelled = np.flatnonzero(table.df[table.label].notna().to_numpy())
    column = image_group_column(table.df)
    groups = table.df[column].astype(str).to_numpy()
    cache: dict[int, tuple[np.ndarray, dict]] = {}

    def qc_and_feats(batches):
        out = clf.outputs(batches, features=True, per_batch=lambda im, _, __: image_numbers(im))
        return out["features"], {k: out[k] for k in (*QC_COLUMNS, "profile")}

    def real(rows):
        todo = np.array([r for r in rows if r not in cache], dtype=np.int64)
        if len(todo):
            f, q = qc_and_feats(field_batches(table, size, todo, clf.batch_size))
            for i, r in enumerate(todo):
                cache[int(r)] = (f[i], {k: q[k][i] for k in q})
        return np.stack([cache[int(r)][0] for r in rows]), {k: np.array([cache[int(r)][1][k] for r in rows]) for k in (*QC_COLUMNS, "profile")}

    shape = next(field_batches(table, size, labelled[:1], 1))[1].shape[1:]
    foreign = ({"foreign_bbbc021": bbbc021_fields, "foreign_translocation": translocation} if cfg.dataset.name == "crchisto"
               else {"foreign_nuclei": nucleus_patches, "foreign_translocation": translocation})
    per_seed = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        names = np.array(sorted(set(groups[labelled])))
        held = set(rng.permutation(names)[: len(names) // 3])
        train = labelled[~np.isin(groups[labelled], list(held))]
        test = labelled[np.isin(groups[labelled], list(held))]
        test = np.sort(rng.choice(test, min(MAX_TEST, len(test)), replace=False))
        ref_rows = train[reference_sample(len(train), seed)]
        f_ref, q_ref = real(ref_rows)
        ref = image_reference(f_ref, groups[ref_rows], column, "benchmark", q_ref["qc_focus"], len(train), profiles=q_ref["profile"])
        f_test, q_test = real(test)
        real_pix = np.concatenate([b for _, b in field_batches(table, size, test[: args.n], args.n)])
        kinds = {"blank": synthetic("blank", args.n, shape, rng, real_pix), "noise": synthetic("noise", args.n, shape, rng, real_pix),
                 "inverted": 255 - real_pix}
        for name, fn in foreign.items():
            kinds[name] = resize_to(fn(data, args.n, rng), shape)
        focus_min = float(ref["focus_min"])

        def scores(f, q):
            d, p = image_distances({k: v for k, v in ref.items() if k != "profiles"}, f)  # the features alone
            _, pc = image_distances(ref, f, q["profile"])  # the shipped score
            flags = qc_flags(q, focus_min)
            qc = np.any([flags[k] for k in flags], axis=0)
            return d, p, pc, qc

        d0, p0, pc0, qc0 = scores(f_test, q_test)
        row = {"seed": seed, "held_out_groups": len(held), "reference_images": len(ref_rows), "real_test_images": len(test),
               "false_flag_distance": float((p0 <= 0.1).mean()), "false_flag_combined": float((pc0 <= 0.1).mean()),
               "false_flag_combined_or_qc": float(((pc0 <= 0.1) | qc0).mean()), "false_flag_qc": float(qc0.mean()), "kinds": {}}
        for name, pix in kinds.items():
            f, q = qc_and_feats([(np.arange(len(pix)), pix)])
            d, p, pc, qc = scores(f, q)
            y = np.r_[np.zeros(len(d0)), np.ones(len(d))]
            row["kinds"][name] = {"auroc_distance": float(roc_auc_score(y, np.r_[d0, d])),
                                  "auroc_combined": float(roc_auc_score(y, -np.r_[pc0, pc])),
                                  "auroc_combined_or_qc": float(roc_auc_score(y, np.r_[2 * qc0 - pc0, 2 * qc - pc])),
                                  "flagged_distance": float((p <= 0.1).mean()), "flagged_combined": float((pc <= 0.1).mean()),
                                  "flagged_combined_or_qc": float(((pc <= 0.1) | qc).mean()), "flagged_qc": float(qc.mean())}
        per_seed.append(row)

    loco = None
    names = np.array(sorted(set(groups[labelled])))
    if len(names) <= LOCO_MAX_GROUPS:  # leave-one-group-out false flags: every group held out once (a steadier estimate)
        f_all, q_all = real(labelled)
        per_group, flagged, total = {}, 0, 0
        for g in names:
            out_g = groups[labelled] == g
            rows = np.flatnonzero(~out_g)[reference_sample(int((~out_g).sum()), 0)]
            ref = image_reference(f_all[rows], groups[labelled][rows], column, "benchmark", q_all["qc_focus"][rows], int((~out_g).sum()),
                                  profiles=q_all["profile"][rows])
            _, p = image_distances(ref, f_all[out_g], q_all["profile"][out_g])
            per_group[str(g)] = round(float((p <= 0.1).mean()), 4)
            flagged, total = flagged + int((p <= 0.1).sum()), total + int(out_g.sum())
        loco = {"protocol": f"leave-one-{column or 'image'}-out: each group's images against a reference of all other groups",
                "false_flag_rate_images": round(flagged / total, 4), "flagged": flagged, "images": total,
                "false_flag_rate_mean_over_groups": round(float(np.mean(list(per_group.values()))), 4),
                "groups_over_10pct": int(sum(v > 0.1 for v in per_group.values())), "per_group": per_group}

    def agg(values):
        v = np.asarray(values, dtype=float)
        return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)), 4) if len(v) > 1 else None,
                "min": round(float(v.min()), 4), "per_seed": [round(float(x), 4) for x in v]}

    kinds = list(per_seed[0]["kinds"])
    out = {"benchmark": "image_novelty", "bundle": str(args.bundle), "dataset": cfg.dataset.name, "model": cfg.model.name, "mode": cfg.mode,
           "feature_space": "frozen backbone" if cfg.mode == "frozen" else "fine-tuned pre-logits",
           "protocol": (f"groups ({column or 'images'}) split at random per seed, 1/3 held out; reference = training groups' images "
                        f"(<= 1000, seeded sample), calibration leave-one-group-out; negatives = held-out groups' images (<= {MAX_TEST}); "
                        f"{args.n} images per garbage kind per seed; flag at 0.9 (p <= 0.1)"),
           "seeds": [r["seed"] for r in per_seed], "n_per_kind": args.n,
           "real_test_images": [r["real_test_images"] for r in per_seed], "reference_images": [r["reference_images"] for r in per_seed],
           "false_flag_rate_distance": agg([r["false_flag_distance"] for r in per_seed]),
           "false_flag_rate_combined": agg([r["false_flag_combined"] for r in per_seed]),
           "false_flag_rate_combined_or_qc": agg([r["false_flag_combined_or_qc"] for r in per_seed]),
           "false_flag_rate_qc": agg([r["false_flag_qc"] for r in per_seed]),
           **{f"auroc_{s}": {k: agg([r["kinds"][k][f"auroc_{s}"] for r in per_seed]) for k in kinds} for s in ("distance", "combined", "combined_or_qc")},
           **{f"flagged_at_0.9_{s}": {k: agg([r["kinds"][k][f"flagged_{s}"] for r in per_seed]) for k in kinds} for s in ("distance", "combined", "combined_or_qc")},
           "flagged_qc": {k: agg([r["kinds"][k]["flagged_qc"] for r in per_seed]) for k in kinds},
           "false_flag_leave_one_group_out": loco,
           "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
