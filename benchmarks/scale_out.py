"""Scale out: wall time of a run with the local backend vs Ray with 1 and 2 workers, and whether the
predictions are byte-identical to the local run's. Prints one JSON line (benchmark "scale_out").

    python benchmarks/scale_out.py --data ../shared/data            # quickstart + a small CPU fine-tune
    python benchmarks/scale_out.py --data ../shared/data --only quickstart
    python benchmarks/scale_out.py --data ../shared/data --only finetune --size 64   # longer folds

Each case runs into a fresh run folder (nothing resumed); Ray times include starting and stopping the
local cluster, as a user's `cellmorph run ... --set execution.backend=ray` pays them. The feature cache
and the fine-tune's 32 px store are warmed first, so the times are folds (+ Ray overhead), not feature
extraction or image decoding.

Cases (on a machine of C cores, C = 2 here):
  local:  one fold after another in this process, torch's default threads (C)
  ray-1:  a local cluster of C CPUs, cpus_per_task = C: one task at a time, C torch threads (the local count)
  ray-2:  a local cluster of C CPUs, cpus_per_task = C/2: two tasks at a time, C/2 threads each
The fine-tune is bitwise the local run's at the same thread count (ray-1); ray-2 is compared against a local
run at C/2 threads too ("identical_at_same_threads").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))



def _timed(cfg, out: Path, data) -> float:
    from cellmorph.engine.runner import run_experiment

    t0 = time.perf_counter()
    run_experiment(cfg, out, data)
    return round(time.perf_counter() - t0, 2)


def _same(a: Path, b: Path) -> bool:
    return (a / "predictions.parquet").read_bytes() == (b / "predictions.parquet").read_bytes()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $CELLMORPH_DATA)")
    ap.add_argument("--only", choices=["quickstart", "finetune"], default=None)
    ap.add_argument("--size", type=int, default=32, help="fine-tune image and input size in pixels (default 32)")
    ap.add_argument("--folds", type=int, default=4, help="fine-tune: the first N LOCO folds (default 4)")
    args = ap.parse_args(argv)
    FINETUNE = [f"dataset.image_size={args.size}", f"model.input_size={args.size}", "finetune.epochs=1", f"evaluation.max_folds={args.folds}"]

    from cellmorph.config import load_config

    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    line = {"benchmark": "scale_out", "cores": cores, "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "quickstart"):
            qs = REPO / "configs" / "quickstart.toml"
            _timed(load_config(qs), tmp / "warm", args.data)  # features into the cache
            r = {"folds": 18}
            r["local_s"] = _timed(load_config(qs), tmp / "qs-local", args.data)
            r["ray1_s"] = _timed(load_config(qs, ["execution.backend=ray", f"execution.num_cpus={cores}", f"execution.cpus_per_task={cores}"]), tmp / "qs-ray1", args.data)
            r["ray2_s"] = _timed(load_config(qs, ["execution.backend=ray", f"execution.num_cpus={cores}", f"execution.cpus_per_task={half}"]), tmp / "qs-ray2", args.data)
            r["identical"] = _same(tmp / "qs-local", tmp / "qs-ray1") and _same(tmp / "qs-local", tmp / "qs-ray2")
            r["ratio_local_over_ray2"] = round(r["local_s"] / r["ray2_s"], 2)
            line["quickstart"] = r
        if args.only in (None, "finetune"):
            ft = REPO / "configs" / "finetune-cpu-smoke.toml"
            r = {"folds": args.folds, "config": "finetune-cpu-smoke.toml + " + " ".join(FINETUNE)}
            from cellmorph.engine.runner import plan_run
            from cellmorph.data.store import build_store

            cfg = load_config(ft, FINETUNE)
            build_store(plan_run(cfg, args.data).table, cfg.dataset.image_size)  # the 32 px store into the cache, untimed
            r["local_s"] = _timed(load_config(ft, FINETUNE), tmp / "ft-local", args.data)
            r["ray1_s"] = _timed(load_config(ft, FINETUNE + ["execution.backend=ray", f"execution.num_cpus={cores}", f"execution.cpus_per_task={cores}"]), tmp / "ft-ray1", args.data)
            r["ray2_s"] = _timed(load_config(ft, FINETUNE + ["execution.backend=ray", f"execution.num_cpus={cores}", f"execution.cpus_per_task={half}"]), tmp / "ft-ray2", args.data)
            r["local_half_threads_s"] = _timed(load_config(ft, FINETUNE + [f"execution.threads={half}"]), tmp / "ft-local-half", args.data)
            r["identical_at_same_threads"] = _same(tmp / "ft-local", tmp / "ft-ray1") and _same(tmp / "ft-local-half", tmp / "ft-ray2")
            r["ratio_local_over_ray2"] = round(r["local_s"] / r["ray2_s"], 2)
            line["finetune"] = r
    line["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
