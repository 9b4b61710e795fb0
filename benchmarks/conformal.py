"""Conformal prediction sets and novelty detection on the quickstart settings (frozen EfficientNet-Lite0,
not ResNet50; logistic head C = 1; BBBC021 6-MoA subset; seed 0), through the CLI as a user runs them:

    CELLMORPH_DATA=../shared/data python benchmarks/conformal.py

1. `cellmorph run configs/quickstart.toml`: metrics.json's `conformal` block, leave-one-compound-out
   coverage and mean set size at 0.8/0.9/0.95 per level (18 compounds, 55 treatments), and the ECE.
2. `cellmorph run configs/lomo.toml`: leave-one-MoA-out, nested calibration; the novelty AUROC and
   flag rates at 0.9, per novel MoA and overall (treatments). `--novelty-score distance|combined`
   runs it with that evaluation.novelty_score (default softmax):

    CELLMORPH_DATA=../shared/data python benchmarks/conformal.py --novelty-score distance

Prints one JSON line. The acceptance targets of the conformal issue are checked and reported as
booleans (`targets`), never asserted: the numbers are what they are.
Reuses $CELLMORPH_CACHE (the features of EfficientNet-Lite0 are extracted once).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: str, out: Path, *overrides: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    sets = [a for o in overrides for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / config), "--out", str(out), *sets], check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - t0


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--novelty-score", choices=["softmax", "distance", "combined"], default="softmax")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        qs, qs_s = run("quickstart.toml", Path(tmp) / "quickstart")
        lomo, lomo_s = run("lomo.toml", Path(tmp) / "lomo", f"evaluation.novelty_score={args.novelty_score}")
    conf = {}
    for lv, s in qs["conformal"]["levels"].items():
        conf[lv] = {"units": s["n_units"], "ece": round(s["ece"], 4), "ece_temperature_scaled": round(s["ece_scaled"], 4), "temperature": round(s["temperature"]["all_units"], 3), "methods": s["methods"],
                    **{c: {"coverage": round(b["coverage"], 4), "covered": b["covered"], "total": b["total"],
                           "mean_set_size": round(b["mean_set_size"], 3), "empty": b["empty"]} for c, b in s["by_confidence"].items()}}
    nov = lomo["novelty"]
    per_moa = {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d["treatment"].items()} for m, d in nov["per_moa"].items()}
    overall = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in nov["overall"]["treatment"].items()}
    t9, i9 = conf["treatment"]["0.9"], conf["image"]["0.9"]
    targets = {
        "treatment_coverage_0.9_in_[0.85,1]": 0.85 <= t9["coverage"] <= 1.0,
        "treatment_set_size_0.9_<=1.3": t9["mean_set_size"] <= 1.3,
        "image_coverage_0.9_>=0.88": i9["coverage"] >= 0.88,
        "image_set_size_0.9_<=1.6": i9["mean_set_size"] <= 1.6,
        "lomo_auroc_>=0.85": overall["auroc"] >= 0.85,
        "lomo_false_flag_0.9_<=0.15": overall["false_flag_rate"] <= 0.15,
    }
    print(json.dumps({
        "benchmark": "conformal", "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "load_avg_1min": round(os.getloadavg()[0], 2),
        "model": qs["context"]["model"], "mode": qs["context"]["mode"], "seed": qs["seeds"], "protocol": qs["protocol"],
        "library": qs["conformal"]["library"], "nonconformity": qs["conformal"]["nonconformity"], "min_per_class": qs["conformal"]["min_per_class"],
        "conformal": conf, "novelty_score": nov.get("score", "softmax"), "lomo_treatments_overall": overall, "lomo_treatments_per_moa": per_moa,
        "targets": targets, "wall_s_quickstart": round(qs_s, 1), "wall_s_lomo": round(lomo_s, 1),
    }))


if __name__ == "__main__":
    main()
