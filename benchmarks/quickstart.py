"""Time the quickstart end to end (the CLI, as a user runs it), cold and warm feature cache.

    CELLMORPH_DATA=../shared/data python benchmarks/quickstart.py

Cold: an empty cache (images decoded, features extracted). Warm: the same cache, a new run folder.
Prints one JSON line: accuracies (LOCO, per treatment and per image), wall seconds, machine.
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


def run(cache: Path, out: Path) -> float:
    env = {**os.environ, "CELLMORPH_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cold = run(tmp / "cache", tmp / "cold")
        warm = run(tmp / "cache", tmp / "warm")
        m = json.loads((tmp / "warm" / "metrics.json").read_text())
        cold_m = json.loads((tmp / "cold" / "metrics.json").read_text())
    assert m["treatments_correct"] == cold_m["treatments_correct"]
    print(
        json.dumps(
            {
                "benchmark": "quickstart",
                "date": date.today().isoformat(),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "model": m["model"],
                "protocol": m["protocol"],
                "treatments_correct": m["treatments_correct"],
                "treatments_total": m["treatments_total"],
                "treatment_accuracy_loco": round(m["treatment_accuracy_loco"], 4),
                "image_accuracy_loco": round(m["image_accuracy_loco"], 4),
                "wall_s_cold": round(cold, 1),
                "wall_s_warm": round(warm, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
