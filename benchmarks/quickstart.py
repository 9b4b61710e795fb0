"""Time the quickstart end to end (the CLI, as a user runs it), cold and warm feature cache.

    CELLMORPH_DATA=../shared/data python benchmarks/quickstart.py

Cold: an empty cache (images decoded, features extracted). Warm: the same cache, a new run folder.
Prints one JSON line: accuracies (LOCO, per treatment and per image), wall seconds, machine; also the
CPU seconds (user + system) of each run and the 1-minute load average, since on a shared machine
other processes' load inflates the wall time but hardly the CPU time.
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

REPO = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cache: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `cellmorph run` of the quickstart."""
    env = {**os.environ, "CELLMORPH_CACHE": str(cache)}
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0, _children_cpu() - c0


def counts(m: dict) -> dict:
    """Model, protocol and (correct, total) per treatment and per image from metrics.json, in its current
    layout (`levels`, `context`) or the earlier flat one."""
    if "levels" in m:
        t, i = m["levels"]["treatment"], m["levels"]["image"]
        return {"model": m["context"]["model"], "protocol": m["protocol"], "treatments": (t["correct"], t["total"]), "images": (i["correct"], i["total"])}
    return {"model": m["model"], "protocol": m["protocol"], "treatments": (m["treatments_correct"], m["treatments_total"]), "images": (m.get("images_correct"), m.get("images_total"))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load = os.getloadavg()[0]
        cold, cold_cpu = run(tmp / "cache", tmp / "cold")
        warm, warm_cpu = run(tmp / "cache", tmp / "warm")
        m = counts(json.loads((tmp / "warm" / "metrics.json").read_text()))
        cold_m = counts(json.loads((tmp / "cold" / "metrics.json").read_text()))
    assert m == cold_m, (m, cold_m)  # the feature cache changes nothing
    (tc, tt), (ic, it) = m["treatments"], m["images"]
    print(
        json.dumps(
            {
                "benchmark": "quickstart",
                "date": date.today().isoformat(),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "model": m["model"],
                "protocol": m["protocol"],
                "treatments_correct": tc,
                "treatments_total": tt,
                "treatment_accuracy_loco": round(tc / tt, 4),
                "images_correct": ic,
                "images_total": it,
                "image_accuracy_loco": round(ic / it, 4) if ic is not None else None,
                "wall_s_cold": round(cold, 1),
                "wall_s_warm": round(warm, 1),
                "cpu_s_cold": round(cold_cpu, 1),
                "cpu_s_warm": round(warm_cpu, 1),
                "load_avg_1min_at_start": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
