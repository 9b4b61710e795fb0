"""Profiles side by side: NSC, NSCB and copairs mAP of MoA retrieval for each representation and recipe.

    CELLMORPH_DATA=../shared/data python benchmarks/profiles.py

Representations (one JSON line per representation and recipe, every variant that was run):
  - frozen EfficientNet-Lite0 embeddings of the BBBC021 6-MoA subset (55 treatments), from a quickstart
    run folder (`cellmorph run configs/quickstart.toml`, then `cellmorph embed`);
  - fine-tuned fold-model embeddings: not run here (needs a GPU fine-tuned run with
    finetune.save_models = true); printed as a row saying so;
  - CellProfiler per-well means of Ljosa et al. 2013 on the same 55 treatments (with the DMSO wells of
    their plates), and on all 103 treatments / 12 MoAs.
Recipes: none (raw profiles, the baseline); robust z-score per plate to DMSO (to all wells where the table has no DMSO), with/without
pycytominer feature selection, with/without ZCA-cor sphering fitted on DMSO (all wells without DMSO); the cytominer gallery's
published recipe without and with similarity network fusion (SNFtool >= 2.2.1's update, then <= 2.2's, the one the gallery ran).
Also one timing line: `cellmorph embed` on the quickstart run vs the quickstart's feature step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEVICE = "this project's 2-core x86_64 CPU, shared with other jobs"
# every recipe that was ever run on these tables (docs/profiles.md says in which order and why)
RECIPES = [dict(normalize="none", feature_select=False), dict(feature_select=False), dict(feature_select=True), dict(feature_select=False, sphere=True), dict(feature_select=True, sphere=True),
           dict(preset="cytominer-gallery"), dict(preset="cytominer-gallery-snf", snf_update="2.3"), dict(preset="cytominer-gallery-snf")]


def row(representation: str, m: dict | None, **extra) -> dict:
    base = {"benchmark": "profiles", "date": date.today().isoformat(), "device": DEVICE, "representation": representation}
    if m is None:
        return {**base, "treatments": None, "moas": None, "nsc": None, "nscb": None, "map": None, **extra}
    c, nsc, nscb, mp = m["counts"], m["nsc"], m["nscb"], m["map"]
    r3 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {**base, "recipe": m["recipe_name"], "treatments": c["treatments"], "moas": c["moas"], "compounds": c["compounds"],
            "nsc": r3(nsc["accuracy"]), "nsc_correct": nsc["correct"], "nsc_total": nsc["total"], "nsc_ci95": [r3(v) for v in nsc.get("ci95") or []] or None,
            "nscb": r3(nscb["accuracy"]), "nscb_correct": nscb["correct"], "nscb_total": nscb["total"], "nscb_ci95": [r3(v) for v in nscb.get("ci95") or []] or None,
            "similarity": m.get("similarity"),
            "map": r3(mp["mean"]), "map_queries": mp["queries"], "wells": c["wells"], "control_wells": c["control_wells"],
            "features_used": m["preparation"]["features_used"], "normalisation": m["preparation"]["normalisation"], **extra}


def main() -> None:
    from cellmorph.config import load_config
    from cellmorph.data.catalog import load_dataset
    from cellmorph.models.features import extract_features
    from cellmorph.profiling.evaluate import evaluate_profiles
    from cellmorph.profiling.recipes import Recipe
    from cellmorph.profiling.tables import annotate_bbbc021, read_profiles
    from cellmorph.data.store import build_store
    from cellmorph.models.train import pick_device

    data = Path(os.environ.get("CELLMORPH_DATA", REPO.parent / "shared" / "data")).resolve()
    meta_dir = data / "bbbc021-metadata"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "CELLMORPH_CACHE": str(tmp / "cache"), "CELLMORPH_DATA": str(data)}
        os.environ["CELLMORPH_CACHE"] = env["CELLMORPH_CACHE"]
        cfg = load_config(REPO / "configs" / "quickstart.toml")
        table = load_dataset(cfg.dataset.name, data, label=cfg.dataset.label)
        store = build_store(table, cfg.dataset.image_size)
        t0 = time.perf_counter()
        extract_features(store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, pick_device("cpu"))  # the quickstart's feature step, cold
        feature_step = time.perf_counter() - t0
        run = tmp / "quickstart"
        subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(run)], env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cellmorph", "embed", str(run)], env=env, check=True, capture_output=True)
        embed_s = time.perf_counter() - t0
        print(json.dumps({"benchmark": "profiles_embed_time", "date": date.today().isoformat(), "device": DEVICE, "model": cfg.model.name, "images": len(table),
                          "feature_step_s_cold": round(feature_step, 2), "embed_cli_s": round(embed_s, 2), "embed_not_slower": embed_s <= feature_step}), flush=True)
        frozen = pd.read_parquet(run / "profiles_well.parquet")

    ljosa = annotate_bbbc021(read_profiles(meta_dir / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"), meta_dir)
    subset = table.df[["Metadata_Compound", "Metadata_Concentration"]].drop_duplicates()
    keys = pd.MultiIndex.from_frame(subset)
    in_subset = pd.MultiIndex.from_frame(ljosa[["Metadata_Compound", "Metadata_Concentration"]]).isin(keys)
    plates = set(ljosa.loc[in_subset, "Metadata_Plate"])
    is_dmso = ljosa["Metadata_Compound"] == "DMSO"
    ljosa55 = ljosa[in_subset | (is_dmso & ljosa["Metadata_Plate"].isin(plates))].reset_index(drop=True)

    tables = [("frozen EfficientNet-Lite0 embeddings (ImageNet, offline weights), 6-MoA subset", frozen),
              ("CellProfiler per-well means (Ljosa et al. 2013), the subset's 55 treatments", ljosa55),
              ("CellProfiler per-well means (Ljosa et al. 2013), all 103 treatments", ljosa)]
    for name, df in tables:
        for kw in RECIPES:
            kw = dict(kw)
            recipe = Recipe.preset(kw.pop("preset"), **kw) if "preset" in kw else Recipe(**kw)
            ev = evaluate_profiles(df, recipe, source=name, representation=name)
            print(json.dumps(row(name, ev.metrics)), flush=True)
        if name.startswith("frozen"):
            print(json.dumps(row("fine-tuned EfficientNet-Lite0 fold-model embeddings, 6-MoA subset", None,
                                 note="not run: needs a fine-tuned run with finetune.save_models = true, a GPU job; this machine has no GPU")), flush=True)


if __name__ == "__main__":
    main()
