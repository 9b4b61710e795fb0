"""Time `cellmorph predict` on the 660 images of the BBBC021 subset with a quickstart bundle, as a user runs it.

    CELLMORPH_DATA=../shared/data python benchmarks/predict.py

The bundle: `cellmorph run configs/quickstart.toml` (frozen offline ImageNet EfficientNet-Lite0 + logistic
head, LOCO 18 folds, final model on all 660 images; features cached in $CELLMORPH_CACHE); its calibration
data are the 660 out-of-fold predictions (55 treatments).
The images: a CellProfiler LoadData CSV of the 660 fields (a new store each time: decoding is timed).
Prints one JSON line: images/s of decoding + prediction (predict.json), the command's wall seconds (process
start, imports and model load included), its CPU seconds and the 1-minute load average (the machine may
be shared: other processes inflate the wall time, hardly the CPU time).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    data = Path(os.environ.get("CELLMORPH_DATA") or REPO.parent / "shared" / "data").resolve()
    root = data / "bbbc021-subset"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(run), "--data", str(data)],
                       check=True, capture_output=True)
        raw = pd.read_csv(root / "bbbc021v1_labels.csv", sep=";", index_col=0)
        csv = tmp / "load_data.csv"
        pd.DataFrame({"Metadata_Plate": raw["plate"], "Metadata_Well": raw["well"], "Metadata_Compound": raw["compound"],
                      "Metadata_Concentration": raw["concentration"], "Image_FileName_RGB": [f"bbbc021v1_{i}.png" for i in raw.index],
                      "Image_PathName_RGB": str(root / "images")}).to_csv(csv, index=False)
        load = os.getloadavg()[0]  # predicting the reference images themselves: the numbers below are a speed test, not an evaluation
        c0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "cellmorph", "predict", str(run / "model"), str(csv), "--out", str(tmp / "pred")], check=True, capture_output=True)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        info = json.loads((tmp / "pred" / "predict.json").read_text())
        treatments = pd.read_csv(tmp / "pred" / "treatments.csv")
    import torch

    print(json.dumps({
        "benchmark": "predict", "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "model": info["architecture"], "mode": info["mode"], "images": info["images"],
        "images_per_s": info["images_per_s"], "seconds_decode_and_predict": info["seconds_decode_and_predict"],
        "wall_s_command": round(wall, 1), "cpu_s_command": round(cpu, 1), "images_per_s_command": round(info["images"] / wall, 2),
        "treatments": len(treatments), "calibration_treatments": info["calibration"]["treatment"].get("n_units"), "mean_set_size_0.9": round(float(treatments["set_size"].mean()), 3),
        "flagged_none_of_known_0.9": int(treatments["none_of_known"].sum()), "load_avg_1min_at_start": round(load, 2),
    }))


if __name__ == "__main__":
    main()
