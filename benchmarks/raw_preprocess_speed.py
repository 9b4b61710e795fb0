"""Raw-plate preprocessing speed: `cellmorph prepare bbbc021` on a synthetic plate of 1280 x 1024 x 3 16-bit fields.

Writes a plate in the Broad's layout (60 wells x 4 sites by default; 12 DMSO wells, 48 treatment wells),
then times the whole prepare (read TIFFs, DMSO histograms, normalise, tile, near-empty rule, write the
store) with --workers threads, and prints ONE JSON line: fields/s, fields/s per worker, peak RSS.
To keep the plate quick to write, --distinct fields are synthesised and the other files are hard links
to them (the pixels repeat; the work per field does not change). The files are read from the page cache
after the first pass: disk speed is not measured.

    python benchmarks/raw_preprocess_speed.py --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd


def write_plate(root: Path, wells: int, sites: int, dmso_wells: int, distinct: int, shape=(1024, 1280)) -> None:
    import tifffile

    from cellmorph.data.datasets.synthetic import CHANNEL_CODES, synthetic_field

    rng = np.random.default_rng(0)
    plate = "Week1_90001"
    folder = root / "bbbc021-raw" / plate
    folder.mkdir(parents=True)
    sources = []
    for i in range(distinct):
        paths = {}
        for ch, level in zip(CHANNEL_CODES, (300.0, 900.0, 1500.0)):
            p = folder / f"src{i}_{ch}.tif"
            tifffile.imwrite(p, synthetic_field(rng, shape, level, cells=6))
            paths[ch] = p
        sources.append(paths)
    names = [f"{r}{c:02d}" for r in "BCDEFG" for c in range(2, 12)][:wells]
    rows, k = [], 0
    for w_i, well in enumerate(names):
        dmso = w_i < dmso_wells
        for s in range(1, sites + 1):
            row = {"TableNumber": 1, "ImageNumber": len(rows) + 1}
            src = sources[k % distinct]
            k += 1
            for ch, code in CHANNEL_CODES.items():
                name = f"Week1_{well}_s{s}_{code}{k:08d}-0000-0000-0000-000000000000.tif"
                os.link(src[ch], folder / name)
                row[f"Image_FileName_{ch}"] = name
                row[f"Image_PathName_{ch}"] = f"Week1/{plate}"
            row.update({"Image_Metadata_Plate_DAPI": plate, "Image_Metadata_Well_DAPI": well, "Replicate": 1,
                        "Image_Metadata_Compound": "DMSO" if dmso else "AZ138", "Image_Metadata_Concentration": 0.0 if dmso else 1.0})
            rows.append(row)
    meta = root / "bbbc021-metadata"
    meta.mkdir()
    pd.DataFrame(rows).to_csv(meta / "BBBC021_v1_image.csv", index=False)
    pd.DataFrame([{"compound": "AZ138", "concentration": 1.0, "moa": "Eg5 inhibitors"},
                  {"compound": "DMSO", "concentration": 0.0, "moa": "DMSO"}]).to_csv(meta / "BBBC021_v1_moa.csv", index=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="raw BBBC021 preprocessing speed on a synthetic plate")
    ap.add_argument("--wells", type=int, default=60)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--dmso-wells", type=int, default=12)
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary folder, removed after)")
    args = ap.parse_args(argv)

    from cellmorph.data.datasets.bbbc021_raw import prepare_bbbc021

    root = Path(tempfile.mkdtemp(prefix="cellmorph-speed-", dir=args.tmp))
    try:
        write_plate(root, args.wells, args.sites, args.dmso_wells, args.distinct)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        load = os.getloadavg()[0]
        cpu0, t0 = time.process_time(), time.perf_counter()
        recipe = prepare_bbbc021(root, root / "prepared", workers=args.workers)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        fields = args.wells * args.sites
        line = {
            "benchmark": "raw_preprocess_speed",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "field": "1280x1024x3 uint16",
            "fields": fields,
            "dmso_fields": args.dmso_wells * args.sites,
            "workers": args.workers,
            "wall_s": round(wall, 2),
            "fields_per_s": round(fields / wall, 2),
            "fields_per_s_per_worker": round(fields / wall / args.workers, 2),
            "fields_per_cpu_s": round(fields / cpu, 2),
            "crops_written": recipe["n_images"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_prepare_mb": round(rss_before, 1),
            "load_avg_1min_at_start": round(load, 2),
        }
        print(json.dumps(line))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
