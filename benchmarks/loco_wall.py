"""Wall time of a full leave-one-compound-out fine-tuning run (18 folds) through `cellmorph run`'s
code path, cold store cache excluded (the store is built first, as a user's second run would find it).

    CELLMORPH_DATA=../shared/data python benchmarks/loco_wall.py configs/tuned/resnet50.toml [--set finetune.eval_every_epoch=false]

Prints one JSON line: wall seconds for the folds and the run's accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from cellmorph.config import load_config
from cellmorph.data.catalog import load_dataset
from cellmorph.engine.runner import run_experiment
from cellmorph.data.store import build_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="Keep the run folder here (default: a temporary folder).")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    build_store(load_dataset(cfg.dataset.name, a.data, label=cfg.dataset.label, **cfg.dataset.options), cfg.dataset.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = run_experiment(cfg, Path(a.out or Path(tmp) / "run"), a.data)
        wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "benchmark": "loco_wall",
                "date": date.today().isoformat(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "config": a.config,
                "overrides": a.overrides,
                "model": cfg.model.name,
                "init": cfg.model.init,
                "epochs": cfg.finetune.epochs,
                "batch": cfg.finetune.batch_size,
                "folds": m.context["n_folds"],
                "protocol": m.protocol,
                "wall_s": round(wall, 1),
                **{f"{lvl}_accuracy": round(s.accuracy, 4) for lvl, s in m.levels.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
