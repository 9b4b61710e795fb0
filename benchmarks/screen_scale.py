"""Screens at scale: `cellmorph predict` on synthetic screens of N fields, against a bare inference loop, one run.

    CELLMORPH_DATA=../shared/data python benchmarks/screen_scale.py --n 660 3300 6600

The screen: the BBBC021 subset's 660 fields, hard-linked N / 660 times under new plate names (`<plate>-copyK`),
as a CellProfiler LoadData CSV: each copy is a new plate of files with new paths (the page cache holds the
bytes after the first read, as it would for a plate read twice; decoding is done every time).
The model: the quickstart bundle (`cellmorph run configs/quickstart.toml`, frozen offline ImageNet
EfficientNet-Lite0 + logistic head, 224 px input; its conformal and distance-novelty scores, so every image's
1,280 features are kept), made once into a temporary folder unless --bundle is given.

Per N, one JSON line:
- peak_rss_mb: the predict process's peak resident memory (VmHWM in its /proc/self/status at exit: from its exec
  to its end, none of this benchmark's own memory);
- images_per_s_command: N / the wall seconds of the whole command (process start, imports, model load,
  decoding, inference, aggregation, conformal sets, report, writing);
- bare_loop_images_per_s: a channels_last, inference_mode forward loop of the same backbone (create_model +
  head-less timm EfficientNet-Lite0) at 224 px, batch 32 (frozen.batch_size), on uint8 tensors already in
  memory, the same torch threads, measured in this run just before the predict runs; ratio = the two;
- bare_loop_folded_images_per_s: the same loop on the batch-norm-folded copy (`train.fold_batch_norm`), the
  network cellmorph's frozen path actually runs, so ratio_command_to_bare_folded compares like with like;
- bare_loop_folded_concurrent_images_per_s: the folded loop with one batch per torch thread at once (plain
  threads, one torch thread each): how cellmorph runs it on a CPU since 2026-12-06 (`models.inference`), so the
  last ratio is the strictest;
- load_avg_1min_at_start: this machine is shared; say the load beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# The predict process reports its own peak: VmHWM of /proc/self/status, the high-water mark of the memory it mapped
# since its exec. (getrusage's ru_maxrss is not that: Linux carries the spawning process's high-water mark across
# the fork and exec, so it reported this benchmark's own peak, ~1.9-2.1 GB after its bare loops, whenever that was
# the larger; RESULTS.md lines logged before "2026-12-06 (night)" have that fault.)
_CHILD = """
import resource, sys
from cellmorph.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
try:
    kb = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
except OSError:  # not Linux: no /proc; ru_maxrss is then the best there is
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH", code, kb, file=sys.stderr)
"""


def make_screen(data: Path, n: int, folder: Path) -> Path:
    """A LoadData CSV of n fields: the subset's fields hard-linked under new plate names (copy k of plate P: P-copyk)."""
    root = data / "bbbc021-subset"
    raw = pd.read_csv(root / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = []
    copies = -(-n // len(raw))
    for k in range(copies):
        d = folder / f"copy{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i, r in raw.iterrows():
            name = f"bbbc021v1_{i}.png"
            if not (d / name).exists():
                os.link(root / "images" / name, d / name)
            rows.append({"Metadata_Plate": f"{r['plate']}-copy{k}", "Metadata_Well": r["well"], "Metadata_Compound": r["compound"],
                         "Metadata_Concentration": r["concentration"], "Image_FileName_RGB": name, "Image_PathName_RGB": str(d)})
    csv = folder / f"screen-{n}.csv"
    pd.DataFrame(rows[:n]).to_csv(csv, index=False)
    return csv


def bare_loop(images: int = 640, batch: int = 32, folded: bool = False, concurrent: bool = False) -> float:
    """Images/s of a bare channels_last forward loop of the backbone at 224 px (after one warm-up batch): timm's
    module as it comes, or (folded=True) the batch-norm-folded copy cellmorph's frozen path runs; with
    concurrent=True, one Python thread per torch thread, each running its share of the batches on one torch
    thread (what cellmorph's models.inference does on a CPU), written here with plain threads."""
    import threading

    import torch

    from cellmorph.models.factory import create_model
    from cellmorph.models.train import fold_batch_norm

    model = create_model("tf_efficientnet_lite0", "imagenet", num_classes=0, in_chans=3).eval()
    model = (fold_batch_norm(model) if folded else model).to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    threads = torch.get_num_threads() if concurrent else 1
    steps = images // batch // threads

    def loop(k: int) -> None:
        with torch.inference_mode():
            for _ in range(k):
                model(x.float().div(255).contiguous(memory_format=torch.channels_last))

    before = torch.get_num_threads()
    if concurrent:
        torch.set_num_threads(1)
    try:
        loop(1)
        workers = [threading.Thread(target=loop, args=(steps,)) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return steps * threads * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[660, 3300])
    ap.add_argument("--bundle", type=Path, default=None, help="a model bundle (default: run the quickstart into a temporary folder)")
    args = ap.parse_args()
    data = Path(os.environ.get("CELLMORPH_DATA") or REPO.parent / "shared" / "data").resolve()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp / "run"),
                            "--data", str(data)], check=True, capture_output=True)
            bundle = tmp / "run" / "model"
        for n in args.n:
            csv = make_screen(data, n, tmp / "screen")
            load = os.getloadavg()[0]
            bare, bare_folded, bare_concurrent = bare_loop(), bare_loop(folded=True), bare_loop(folded=True, concurrent=True)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _CHILD, "predict", str(bundle), str(csv), "--out", str(tmp / f"pred-{n}")],
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            line = [ln for ln in res.stderr.splitlines() if ln.startswith("BENCH")]
            if res.returncode != 0 or not line or line[-1].split()[1] != "0":
                sys.exit(f"predict failed on {n} fields:\n{res.stderr[-2000:]}")
            info = json.loads((tmp / f"pred-{n}" / "predict.json").read_text())
            rate = n / wall
            print(json.dumps({
                "benchmark": "screen_scale", "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "torch_threads": torch.get_num_threads(), "model": info["architecture"], "mode": info["mode"], "input_px": 224, "fields": n,
                "plates": int(pd.read_csv(csv)["Metadata_Plate"].nunique()), "novelty_score": info["novelty_score"],
                "peak_rss_mb": round(int(line[-1].split()[2]) / 1024, 1), "wall_s_command": round(wall, 1),
                "images_per_s_command": round(rate, 2), "images_per_s_decode_and_predict": info["images_per_s"],
                "bare_loop_images_per_s": round(bare, 2), "ratio_command_to_bare": round(rate / bare, 3),
                "bare_loop_folded_images_per_s": round(bare_folded, 2), "ratio_command_to_bare_folded": round(rate / bare_folded, 3),
                "bare_loop_folded_concurrent_images_per_s": round(bare_concurrent, 2),
                "ratio_command_to_bare_folded_concurrent": round(rate / bare_concurrent, 3),
                "load_avg_1min_at_start": round(load, 2),
            }), flush=True)
            for f in (tmp / "screen").glob("screen-*.csv"):
                f.unlink()


if __name__ == "__main__":
    main()
