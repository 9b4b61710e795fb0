"""The paper's translocation experiment (Kensert et al. 2019, Fig 4) on BBBC013, in one process.

Pretrained (offline ImageNet EfficientNet-Lite0) vs scratch (Xavier), each replicate trained once up to
the last of --epochs and evaluated after each of them; 2-fold CV over plate rows A-D vs E-H. Writes to
--out: replicates/*.json (one per finished replicate: a rerun resumes), replicates.csv (per-replicate,
per-epoch per-image accuracy), wells.csv (mean P(translocated) per well, all 96 wells), results.json
(counts of 100% replicates, dose-response 4PL fit and Z'), fig4.png, dose_response.png; and prints one
JSON line (the summary counts).

    # the full experiment (GPU):
    python benchmarks/translocation_replicates.py --data ../shared/data --out runs/translocation --replicates 30 --epochs 1,5,10,20
    # a CPU smoke run:
    python benchmarks/translocation_replicates.py --data ../shared/data --out /tmp/t --replicates 1 --epochs 1 --input-size 64 --limit 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="results folder (rerun the same command to resume)")
    ap.add_argument("--data", type=Path, default=None, help="data folder holding bbbc013/ (default: $CELLMORPH_DATA)")
    ap.add_argument("--dataset", default="bbbc013", choices=["bbbc013", "bbbc014"])
    ap.add_argument("--replicates", type=int, default=30)
    ap.add_argument("--epochs", default="1,5,10,20", help="comma-separated epochs to evaluate at (trained once to the last)")
    ap.add_argument("--settings", default="pretrained,scratch")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=224, help="crops (160 px on BBBC013) are resized to this on the device")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--limit", type=int, default=16, help="crops per well to use (16 = all; fewer for quick CPU runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepared", type=Path, default=None, help="a prepared store folder (default: prepared once into the cache)")
    args = ap.parse_args(argv)

    from cellmorph.datasets import resolve_data_dir
    from cellmorph.errors import CellmorphError
    from cellmorph.translocation import Settings, run_translocation

    try:
        s = Settings(model=args.model, input_size=args.input_size, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                     eval_epochs=tuple(sorted({int(e) for e in args.epochs.split(",")})), crops_per_well=args.limit)
        summary = run_translocation(args.out, resolve_data_dir(args.data), args.dataset, args.replicates, s,
                                    tuple(x.strip() for x in args.settings.split(",")), args.device, args.seed, args.prepared,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except CellmorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    line = {"benchmark": "translocation_replicates", "dataset": summary["dataset"], "device": summary["device_name"],
            "replicates": summary["replicates"], "counts": summary["counts"], "z_prime_per_series": {k: v["z_prime"] for k, v in summary["dose_response"]["series"].items()},
            "x50_per_series": {k: v["fit_4pl"].get("x50") for k, v in summary["dose_response"]["series"].items()},
            "seconds": summary["seconds_this_invocation"], "out": str(args.out)}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
