"""Kensert et al.'s translocation replicates (Fig 4) on BBBC013: runs the configs
configs/translocation/bbbc013-{pretrained,scratch}-replicates.toml through cellmorph's one runner and
collects the counts; no experiment logic here.

    # the full experiment (a GPU job: 30 replicates x 20 epochs per setting):
    python benchmarks/translocation_replicates.py --data ../shared/data --out runs/translocation
    # a CPU smoke run:
    python benchmarks/translocation_replicates.py --data ../shared/data --out /tmp/t --replicates 1 --epochs 1 --input-size 64 --crops-per-well 2

Each setting is a run folder OUT/<setting>/ (resumable; dose_response.png and fig4.png inside), and
OUT/summary/ holds `cellmorph summarize` of both. Prints one JSON line per setting
(benchmark "translocation": setting, replicates, perfect_after_1_epoch, and per evaluated epoch the
replicates at 100% of the labelled wells).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without installing, too


def replicate_line(m) -> dict:
    """The replicate counts of a translocation run's Metrics: replicates (seeds), per evaluated epoch how
    many replicates reached 100% of the labelled wells, and that count after 1 epoch (the paper's claim)."""
    per_epoch: dict[str, dict] = {}
    for point in m.curve:
        e = per_epoch.setdefault(str(point["epoch"]), {"replicates_100pct": 0, "replicates": 0})
        e["replicates"] += 1
        e["replicates_100pct"] += int(point["well"] == 1.0)
    return {"replicates": len(m.seeds), "perfect_after_1_epoch": per_epoch.get("1", {}).get("replicates_100pct"), "per_epoch": per_epoch,
            "well_accuracy_mean": round(m.level("well").accuracy, 4)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the run folders (rerun the same command to resume)")
    ap.add_argument("--data", type=Path, default=None, help="data folder holding bbbc013/ (default: $CELLMORPH_DATA)")
    ap.add_argument("--settings", default="pretrained,scratch")
    ap.add_argument("--replicates", type=int, default=0, help="replicate seeds 0..N-1 (0 = the config's 30)")
    ap.add_argument("--epochs", default="", help="comma-separated epochs to evaluate at, trained once to the last (default: the config's 1,5,10,20)")
    ap.add_argument("--input-size", type=int, default=0, help="network input size (0 = the config's 224)")
    ap.add_argument("--crops-per-well", type=int, default=0, help="crops per well (0 = the config's 16; fewer for a quick CPU run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", choices=["local", "ray"], default="local", help="ray: the replicate seeds x folds run as Ray tasks (docs/scaling.md)")
    ap.add_argument("--gpus-per-task", type=float, default=0.0, help="Ray: GPUs per task (fractional: several replicates share a GPU)")
    args = ap.parse_args(argv)

    from cellmorph.config import load_config, override
    from cellmorph.errors import CellmorphError
    from cellmorph.engine.runner import run_experiment
    from cellmorph.reporting.summary import summarize_runs

    changes: dict = {"device": args.device, "execution.backend": args.backend, "execution.gpus_per_task": args.gpus_per_task}
    if args.replicates:
        changes["seeds"] = list(range(args.replicates))
    if args.epochs:
        epochs = sorted({int(e) for e in args.epochs.split(",")})
        changes.update({"finetune.epochs": max(epochs), "finetune.eval_epochs": epochs})
    if args.input_size:
        changes["model.input_size"] = args.input_size
    if args.crops_per_well:
        changes["dataset.options"] = {"crops_per_well": args.crops_per_well}
    lines, runs = [], []
    from contextlib import ExitStack

    cluster = ExitStack()
    try:
        if args.backend == "ray":  # one local Ray cluster for all the runs
            from cellmorph.config import ExecutionConfig
            from cellmorph.engine.ray_backend import ray_session

            cluster.enter_context(ray_session(ExecutionConfig(backend="ray")))
        for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
            cfg = override(load_config(REPO / "configs" / "translocation" / f"bbbc013-{setting}-replicates.toml"), changes)
            t0 = time.perf_counter()
            m = run_experiment(cfg, args.out / setting, args.data)
            runs.append(args.out / setting)
            line = {"benchmark": "translocation", "dataset": "bbbc013", "setting": setting, "model": cfg.model.name, "init": cfg.model.init,
                    **replicate_line(m), "device": json.loads((args.out / setting / "environment.json").read_text())["device_name"],
                    "seconds": round(time.perf_counter() - t0, 1), "out": str(args.out / setting)}
            print(json.dumps(line), flush=True)
            lines.append(line)
        summarize_runs(runs, args.out / "summary")
    except CellmorphError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        cluster.close()
    return lines


if __name__ == "__main__":
    main()
