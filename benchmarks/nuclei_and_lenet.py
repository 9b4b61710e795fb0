"""Issue 5 in one process: nuclei in H&E (transfer vs scratch, two splits) and the course lab's LeNet.

    python benchmarks/nuclei_and_lenet.py --out OUT [--data DIR] [--quick] [--parts nuclei,lenet]

Part "nuclei" (CRCHistoPhenotypes, epithelial / fibroblast / inflammatory, 32x32 patches): every run
trains with Bayramoglu & Heikkilae's recipe (configs/nuclei-transfer.toml: SGD momentum 0.9, lr 0.001,
Caffe "inv" schedule gamma 0.001 power 0.75, new head at 10x lr, 10 epochs, batch 100 (50 for VGG16
and GoogLeNet), mean subtraction) and records test accuracy every few iterations (their Fig 2):

- transfer: offline ImageNet EfficientNet-Lite0 (the only ImageNet weights available offline);
- scratch: EfficientNet-Lite0, AlexNet, VGG16, GoogLeNet (Glorot-uniform init, all layers at 1x lr);
- "tuned" transfer: EfficientNet-Lite0 with dihedral augmentation, lr 0.01, cosine, 15 epochs
  (our own recipe, reported beside the paper's, never instead of it);

on the paper's random 17,004 / 3,401 split, and the transfer/scratch EfficientNet-Lite0 runs again on
the split grouped by source image (no image on both sides). Patches stay on the device as uint8;
they are upsampled to the model input there (64 px; 96 px for the tuned run).

Part "lenet" (BBBC021 6-MoA subset): the lab's CNN through `cellmorph run`'s own runner with the
configs configs/lenet-lab{,-dropout,-augment}.toml on the 75/25 split and leave-one-compound-out.

Writes OUT/results.json (rewritten after every run, so a killed run keeps what finished; the same
command again resumes, skipping the nuclei runs already there), the curve
plots OUT/curves_<split>.png, OUT/lenet/<run>/ run folders; prints one JSON line at the end.
--quick shrinks everything to a CPU smoke (2 H&E images, one epoch, 32/64 px inputs, 3 curve points,
one LOCO fold).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without installing, too

from cellmorph.config import AugmentConfig, load_config  # noqa: E402
from cellmorph.datasets import load_dataset  # noqa: E402
from cellmorph.io import atomic_path, write_json  # noqa: E402
from cellmorph.models import create_model  # noqa: E402
from cellmorph.splits import PROTOCOL_DESCRIPTIONS, PROTOCOLS  # noqa: E402
from cellmorph.store import build_store  # noqa: E402
from cellmorph.train import fit, make_input_spec, pick_device, predict_proba  # noqa: E402

NO_AUGMENT = AugmentConfig(dihedral=False, jitter_scale=0.0, jitter_shift=0.0, blur_p=0.0, noise_std=0.0)


def nuclei_runs(quick: bool, all_runs: bool = False) -> list[dict]:
    """(split, label, arch, init, recipe overrides) for each nuclei run, most important first."""
    big = {"batch_size": 50}  # the paper's batch for its large models
    runs = [
        {"split": "random", "run": "transfer", "arch": "tf_efficientnet_lite0", "init": "imagenet", "input": 64, "ft": {"head_lr_mult": 10.0}},
        {"split": "random", "run": "scratch", "arch": "tf_efficientnet_lite0", "init": "xavier", "input": 64, "ft": {}},
        {"split": "image-grouped", "run": "transfer", "arch": "tf_efficientnet_lite0", "init": "imagenet", "input": 64, "ft": {"head_lr_mult": 10.0}},
        {"split": "image-grouped", "run": "scratch", "arch": "tf_efficientnet_lite0", "init": "xavier", "input": 64, "ft": {}},
        {"split": "random", "run": "scratch", "arch": "alexnet", "init": "xavier", "input": 64, "ft": {}},
        {"split": "random", "run": "scratch", "arch": "vgg16", "init": "xavier", "input": 64, "ft": big},
        {"split": "random", "run": "scratch", "arch": "googlenet", "init": "xavier", "input": 64, "ft": big},
    ]
    tuned = {"lr": 0.01, "schedule": "cosine", "epochs": 15, "head_lr_mult": 10.0, "normalize": "imagenet", "augment": AugmentConfig(dihedral=True, jitter_scale=0.05, jitter_shift=0.02, blur_p=0.0, noise_std=0.0)}
    runs += [
        {"split": "random", "run": "transfer-tuned", "arch": "tf_efficientnet_lite0", "init": "imagenet", "input": 96, "ft": tuned},
        {"split": "image-grouped", "run": "transfer-tuned", "arch": "tf_efficientnet_lite0", "init": "imagenet", "input": 96, "ft": tuned},
    ]
    if quick and not all_runs:  # a CPU smoke: transfer on the random split, scratch on the grouped one
        runs = [runs[0], runs[3]]  # random/transfer, image-grouped/scratch
        for r in runs:
            r["input"] = 32
            r["ft"] = {**r["ft"], "batch_size": 50}
    return runs


def run_key(run: dict) -> str:
    """'split/run/arch', e.g. 'random/transfer/tf_efficientnet_lite0' (what --runs selects by prefix)."""
    return f"{run['split']}/{run['run']}/{run['arch']}"


def curve_plot(path: Path, curves: list[dict], split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for c in curves:
        style = "-" if c["init"] == "imagenet" else "--"
        ax.plot(c["iterations"], c["test_accuracy"], style, label=f"{c['arch']} {c['run']} ({c['final_test_accuracy']:.1%})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (per nucleus)")
    ax.set_title(f"CRCHistoPhenotypes nuclei, {split} split: transfer (solid) vs scratch (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_nuclei(args, device, results: dict, save) -> None:
    base = load_config(REPO / "configs" / "nuclei-transfer.toml")
    options = dict(base.dataset.options)
    if args.max_images:
        options["max_images"] = args.max_images
    table = load_dataset("crchisto", args.data, label=base.dataset.label, **options)
    store = build_store(table)
    classes = table.classes
    y = store.index[table.label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    images = torch.from_numpy(np.asarray(store.images)).to(device)  # uint8, once
    folds = {s: PROTOCOLS[s](store.index)[0] for s in ("random", "image-grouped")}
    results["nuclei"] = {
        "dataset": "crchisto",
        "classes": classes,
        "n_nuclei": len(y),
        "patch_size": table.patch_size,
        "splits": {s: {"description": PROTOCOL_DESCRIPTIONS[s], "n_train": len(f.train), "n_test": len(f.test), "test_images": int(store.index.Metadata_Image.iloc[f.test].nunique())} for s, f in folds.items()},
        "recipe": base.finetune.model_dump(mode="json"),
        "runs": [],
    }
    done = {run_key(r): r for r in args.previous.get("nuclei", {}).get("runs", [])}
    for spec in nuclei_runs(args.quick, args.all_runs):
        key = run_key(spec)
        if key in done:  # finished by an earlier invocation with the same --out: keep it, selected or not
            results["nuclei"]["runs"].append(done[key])
            print(f"nuclei {key}: done before ({done[key]['final_test_accuracy']:.2%}), kept", flush=True)
            continue
        if args.archs and spec["arch"] not in args.archs:
            continue
        if args.runs and not any(key.startswith(r) for r in args.runs):
            continue
        fold = folds[spec["split"]]
        ft = base.finetune.model_copy(update={"augment": NO_AUGMENT, "head_lr_mult": 1.0, **spec["ft"], **({"epochs": args.epochs} if args.epochs else {})})
        torch.manual_seed(args.seed)
        model = create_model(spec["arch"], spec["init"], num_classes=len(classes), in_chans=images.shape[1])
        input_spec = make_input_spec(model, spec["input"], ft.normalize, images[fold.train])
        n_train, bs = len(fold.train), ft.batch_size
        steps = ft.epochs * (n_train // min(bs, n_train))  # as fit() counts them: whole batches only
        every = max(1, steps // args.curve_points)
        test_x, test_y = images[fold.test], y[fold.test]
        curve_it, curve_acc = [], []

        def evaluate(it, m):
            probs = predict_proba(m, test_x, input_spec, device, batch_size=1024)
            curve_it.append(it)
            curve_acc.append(float((probs.argmax(1) == test_y).mean()))
            m.train()
            return probs

        evaluate(0, model)
        t0 = time.perf_counter()
        hist = fit(model, images[fold.train], y[fold.train], len(classes), ft, input_spec, device, args.seed,
                   on_iteration=lambda it, m: evaluate(it, m) if it % every == 0 and it != steps else None)
        train_s = time.perf_counter() - t0
        probs = evaluate(steps, model)
        pred = probs.argmax(1)
        row = {
            "split": spec["split"],
            "run": spec["run"],
            "arch": spec["arch"],
            "init": spec["init"],
            "input_size": spec["input"],
            "seed": args.seed,
            "epochs": ft.epochs,
            "batch_size": ft.batch_size,
            "recipe_overrides": {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in spec["ft"].items()},
            "iterations": curve_it,
            "test_accuracy": curve_acc,
            "final_test_accuracy": curve_acc[-1],
            "test_correct": int((pred == test_y).sum()),
            "n_test": len(test_y),
            "n_train": len(fold.train),
            "per_class_accuracy": {c: float((pred[test_y == i] == i).mean()) for i, c in enumerate(classes) if (test_y == i).any()},
            "final_train_loss": hist.loss[-1],
            "train_seconds_with_curve_evals": round(train_s, 1),
            "train_images_per_s_last_epoch_with_curve_evals": round(hist.images_per_s[-1], 1),
        }
        results["nuclei"]["runs"].append(row)
        print(f"nuclei {row['split']:>13} {row['run']:>14} {row['arch']:>22}: test accuracy {row['final_test_accuracy']:.2%} ({row['test_correct']}/{row['n_test']}), {train_s:.0f} s", flush=True)
        save()
        for split in ("random", "image-grouped"):
            rows = [r for r in results["nuclei"]["runs"] if r["split"] == split]
            if rows:
                curve_plot(args.out / f"curves_{split}.png", rows, split)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_lenet(args, device, results: dict, save) -> None:
    from cellmorph.experiment import run_experiment

    results["lenet"] = {"runs": []}
    todo = [("lenet-lab", "holdout-25"), ("lenet-lab-dropout", "holdout-25"), ("lenet-lab-augment", "holdout-25"), ("lenet-lab", "loco")]
    if args.lenet_loco_variants:
        todo += [("lenet-lab-dropout", "loco"), ("lenet-lab-augment", "loco")]
    if args.quick:
        todo = [("lenet-lab-dropout", "loco")]  # (tests/test_experiment.py runs lenet-lab on holdout-25)
    for name, protocol in todo:
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        cfg = cfg.model_copy(update={"device": str(device), "seed": args.seed, "evaluation": cfg.evaluation.model_copy(update={"protocol": protocol})})
        if args.quick:
            cfg = cfg.model_copy(update={
                "dataset": cfg.dataset.model_copy(update={"image_size": 64}),
                "model": cfg.model.model_copy(update={"input_size": 64}),
                "finetune": cfg.finetune.model_copy(update={"epochs": 1}),
                "evaluation": cfg.evaluation.model_copy(update={"max_folds": 1}),
            })
        t0 = time.perf_counter()
        m = run_experiment(cfg, args.out / "lenet" / f"{name}-{protocol}", args.data)
        row = {
            "config": f"configs/{name}.toml",
            "protocol": protocol,
            "seed": args.seed,
            "epochs": cfg.finetune.epochs,
            "n_folds": m["n_folds"],
            f"image_accuracy_{protocol}": m[f"image_accuracy_{protocol}"],
            "images_correct": m["images_correct"],
            "images_total": m["images_total"],
            f"treatment_accuracy_{protocol}": m.get(f"treatment_accuracy_{protocol}"),
            "treatments_correct": m.get("treatments_correct"),
            "treatments_total": m.get("treatments_total"),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results["lenet"]["runs"].append(row)
        t = f", treatments {row['treatments_correct']}/{row['treatments_total']}" if row["treatments_total"] else ""
        print(f"lenet {name:>18} {protocol:>10}: image accuracy {row[f'image_accuracy_{protocol}']:.2%} ({row['images_correct']}/{row['images_total']}){t}, {row['seconds']:.0f} s", flush=True)
        save()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json, curve plots and LeNet run folders")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $CELLMORPH_DATA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="nuclei,lenet", help="comma-separated: nuclei, lenet")
    ap.add_argument("--archs", default="", help="only these nuclei architectures (comma-separated); default all")
    ap.add_argument("--runs", default="", help="only the nuclei runs whose 'split/run/arch' starts with one of these (comma-separated), e.g. random/transfer")
    ap.add_argument("--curve-points", type=int, default=25, help="test-accuracy evaluations per nuclei run")
    ap.add_argument("--no-lenet-loco-variants", dest="lenet_loco_variants", action="store_false", help="LOCO for the base LeNet only")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 2 H&E images, 1 epoch, small inputs, 1 LOCO fold, 2 nuclei runs")
    ap.add_argument("--all-runs", action="store_true", help="with --quick: every nuclei run at its full input size (a CPU check of the full list)")
    ap.add_argument("--max-images", type=int, default=0, help="nuclei from the first N H&E images only (0 = all 100; --quick: 2)")
    ap.add_argument("--epochs", type=int, default=0, help="override every nuclei run's epochs (0 = the recipe's; --quick: 1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_images = args.max_images or 2
        args.epochs = args.epochs or 1
    args.archs = [a for a in args.archs.split(",") if a]
    args.runs = [r for r in args.runs.split(",") if r]
    if args.quick:
        args.curve_points = min(args.curve_points, 3)
    parts = [p for p in args.parts.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    results = {
        "benchmark": "nuclei_and_lenet",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "quick": args.quick,
        "seed": args.seed,
        "max_images": args.max_images,
        "epochs_override": args.epochs,
    }
    # A rerun with the same --out, seed, --quick, --max-images and --epochs resumes: the nuclei runs
    # already in results.json are kept, not trained again (each is saved the moment it finishes).
    args.previous = {}
    if (args.out / "results.json").is_file():
        prev = json.loads((args.out / "results.json").read_text())
        if all(prev.get(k) == results[k] for k in ("seed", "quick", "max_images", "epochs_override")):
            args.previous = prev
            for part in ("nuclei", "lenet"):  # a part not run this time keeps its earlier results
                if part in prev:
                    results[part] = prev[part]
    save = lambda: write_json(args.out / "results.json", results)  # noqa: E731
    t0 = time.perf_counter()
    if "nuclei" in parts:
        run_nuclei(args, device, results, save)
    if "lenet" in parts:
        run_lenet(args, device, results, save)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    summary = {"benchmark": "nuclei_and_lenet", "device": results["device"], "quick": args.quick, "seed": args.seed, "total_seconds": results["total_seconds"]}
    for r in results.get("nuclei", {}).get("runs", []):
        summary[f"nuclei_{r['split']}_{r['run']}_{r['arch']}"] = round(r["final_test_accuracy"], 4)
    for r in results.get("lenet", {}).get("runs", []):
        p = r["protocol"]
        summary[f"{Path(r['config']).stem}_{p}_image"] = round(r[f"image_accuracy_{p}"], 4)
        if r["treatments_total"]:
            summary[f"{Path(r['config']).stem}_{p}_treatment"] = round(r[f"treatment_accuracy_{p}"], 4)
    print(json.dumps(summary), flush=True)
    return results


if __name__ == "__main__":
    main()
