"""Nuclei in H&E (Bayramoglu & Heikkilae 2016, CRCHistoPhenotypes) and the course lab's LeNet, through
cellmorph's one runner: this script picks configs, runs them, and collects numbers (no training or
scoring code of its own).

    python benchmarks/nuclei_and_lenet.py --out OUT [--data DIR] [--quick] [--parts nuclei,lenet] [--runs PREFIX,...]

Part "nuclei": configs/nuclei/{transfer,scratch}-{random,image-grouped}.toml (offline ImageNet
EfficientNet-Lite0 vs Glorot-uniform scratch, the paper's recipe, test accuracy every 68 iterations
as their Fig 2) and the paper's other networks from scratch on the random split: AlexNet and GenderNet
(Caffe-style Gaussian init and Caffe's input: 0-255 minus the mean, as the paper), VGG16 and GoogLeNet (Glorot-uniform). Part "lenet": the
lab's CNN (configs/lenet-lab*.toml) on the 75/25 split and leave-one-compound-out.

Every run is a run folder OUT/<key>/ (a rerun resumes; finished runs are kept); OUT/summary_<split>/
holds `cellmorph summarize` (curves.png: accuracy vs iteration, transfer solid, scratch dashed).
Prints one JSON line per run (benchmark "nuclei" or "lenet") and nothing else on stdout.
--quick shrinks everything to a CPU smoke (2 H&E images, 1 epoch, 32 px input, 1 LOCO fold).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without installing, too

NUCLEI = [  # (key, config, overrides), most important first
    ("random/transfer/tf_efficientnet_lite0", "nuclei/transfer-random", {}),
    ("random/scratch/tf_efficientnet_lite0", "nuclei/scratch-random", {}),
    ("image-grouped/transfer/tf_efficientnet_lite0", "nuclei/transfer-image-grouped", {}),
    ("image-grouped/scratch/tf_efficientnet_lite0", "nuclei/scratch-image-grouped", {}),
    ("random/scratch/gendernet", "nuclei/scratch-random", {"model.name": "gendernet", "model.init": "gaussian", "finetune.normalize": "caffe"}),
    ("random/scratch/alexnet", "nuclei/scratch-random", {"model.name": "alexnet", "model.init": "gaussian", "finetune.normalize": "caffe"}),
    ("random/scratch/vgg16", "nuclei/scratch-random", {"model.name": "vgg16", "finetune.batch_size": 50}),
    ("random/scratch/googlenet", "nuclei/scratch-random", {"model.name": "googlenet", "finetune.batch_size": 50}),
]
LENET = [("lenet-lab", "holdout-25"), ("lenet-lab-dropout", "holdout-25"), ("lenet-lab-augment", "holdout-25"), ("lenet-lab", "loco")]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the run folders (rerun to resume)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $CELLMORPH_DATA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="nuclei,lenet", help="comma-separated: nuclei, lenet")
    ap.add_argument("--runs", default="", help="only the nuclei runs whose 'split/run/arch' key starts with one of these (comma-separated)")
    ap.add_argument("--backend", choices=["local", "ray"], default="local", help="ray: each run's folds (and seeds) as Ray tasks on one cluster; runs one after another")
    ap.add_argument("--gpus-per-task", type=float, default=0.0, help="Ray: GPUs per task (fractional allowed)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 2 H&E images, 1 epoch, 32 px input, 2 nuclei runs, 1 LOCO fold")
    args = ap.parse_args(argv)

    from cellmorph.config import load_config, override
    from cellmorph.errors import CellmorphError
    from cellmorph.engine.runner import run_experiment
    from cellmorph.reporting.summary import summarize_runs

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    wanted = [r for r in args.runs.split(",") if r]
    lines = []

    def run(kind: str, key: str, config: str, changes: dict) -> dict:
        cfg = override(load_config(REPO / "configs" / f"{config}.toml"), {"device": args.device, "seed": args.seed, **changes,
                                                                              "execution.backend": args.backend, "execution.gpus_per_task": args.gpus_per_task})
        t0 = time.perf_counter()
        m = run_experiment(cfg, args.out / key.replace("/", "_"), args.data)
        line = {"benchmark": kind, "key": key, "config": f"configs/{config}.toml", "overrides": changes, "model": cfg.model.name, "init": cfg.model.init,
                "protocol": cfg.evaluation.protocol, "seed": args.seed, "quick": args.quick, **level_fields(m), "seconds": round(time.perf_counter() - t0, 1)}
        if kind == "nuclei":
            line.update({"split": key.split("/")[0], "accuracy": m.level("image").accuracy})
        print(json.dumps(line), flush=True)
        return line

    from contextlib import ExitStack

    cluster = ExitStack()
    try:
        if args.backend == "ray":  # one local Ray cluster for all the runs
            from cellmorph.config import ExecutionConfig
            from cellmorph.engine.ray_backend import ray_session

            cluster.enter_context(ray_session(ExecutionConfig(backend="ray")))
        if "nuclei" in parts:
            todo = [r for r in NUCLEI if not wanted or any(r[0].startswith(w) for w in wanted)]
            quick = {"dataset.options.max_images": 2, "finetune.epochs": 1, "model.input_size": 32, "finetune.batch_size": 50,
                     "finetune.eval_every_iterations": 2} if args.quick else {}
            if args.quick:
                todo = [todo[0], todo[3]] if len(todo) > 3 else todo[:1]
            for key, config, changes in todo:
                lines.append(run("nuclei", key, config, {**changes, **quick}))
            for split in ("random", "image-grouped"):
                runs = [args.out / r[0].replace("/", "_") for r in todo if r[0].startswith(split + "/")]
                if runs:
                    summarize_runs(runs, args.out / f"summary_{split}")
        if "lenet" in parts:
            todo = [("lenet-lab-dropout", "loco")] if args.quick else LENET
            quick = {"dataset.image_size": 64, "model.input_size": 64, "finetune.epochs": 1, "evaluation.max_folds": 1} if args.quick else {}
            for name, protocol in todo:
                lines.append(run("lenet", f"lenet/{name}/{protocol}", name, {"evaluation.protocol": protocol, **quick}))
    except CellmorphError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        cluster.close()
    return lines


def level_fields(m) -> dict:
    """Flat JSON fields of a run's Metrics: accuracy, counts, balanced accuracy and macro-F1 per level."""
    out = {}
    for level, s in m.levels.items():
        out.update({f"{level}_accuracy": round(s.accuracy, 4), f"{level}_correct": s.correct, f"{level}_total": s.total,
                    f"{level}_balanced_accuracy": round(s.balanced_accuracy, 4), f"{level}_macro_f1": round(s.macro_f1, 4)})
    return out


if __name__ == "__main__":
    main()
