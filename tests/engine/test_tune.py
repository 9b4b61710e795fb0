"""`cellmorph tune` (cellmorph.engine.tune): candidates scored on the inner split only, the best one run once on the
outer split and recorded, resume, budget and refusals. The real BBBC021 images at 32 px and the real networks
(LeNet and ResNet18 from scratch: seconds on a CPU); the nuclei numbers are benchmarks (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cellmorph.config import load_config
from cellmorph.errors import CellmorphError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.toml"
SMALL = ["evaluation.protocol=holdout-25", "dataset.image_size=32", "execution.threads=1"]
CHEAP = ["lenet-scratch", "resnet18-scratch"]


@pytest.fixture(scope="module")
def tuned(data_dir, tmp_path_factory):
    from cellmorph.engine.tune import tune

    out = tmp_path_factory.mktemp("tune") / "t"
    m = tune(load_config(QUICKSTART, SMALL), out, data_dir, budget_min=45, only=CHEAP)
    return out, m


def _images(predictions: Path) -> set[str]:
    """The images a run scored (its predictions' file paths)."""
    df = pd.read_parquet(predictions)
    return set(df[[c for c in df.columns if c.startswith("Image_Path_")]].astype(str).agg("|".join, axis=1))


def test_candidates_are_scored_on_the_inner_split_and_the_best_runs_once_on_the_outer_split(tuned):
    out, m = tuned
    rec = m.context["tune"]
    assert [r["name"] for r in rec["candidates"]] == CHEAP and rec["native_px"] == 32
    scores = {r["name"]: r["inner"]["balanced_accuracy"] for r in rec["candidates"]}
    assert rec["chosen"] == max(CHEAP, key=lambda k: (scores[k], -CHEAP.index(k)))
    assert [r["chosen"] for r in rec["candidates"]].count(True) == 1
    # the inner scores are those of the candidates' run folders, whose rows never include an outer test row
    outer_test = _images(out / "final" / "predictions.parquet")
    assert len(outer_test) == m.level("image").total
    for r in rec["candidates"]:
        cm = json.loads((out / r["folder"] / "metrics.json").read_text())
        assert cm["levels"]["image"]["balanced_accuracy"] == pytest.approx(r["inner"]["balanced_accuracy"], abs=1e-4)
        assert "validation" in cm["protocol_description"]
        inner = _images(out / r["folder"] / "predictions.parquet")
        assert inner and not inner & outer_test, f"{r['name']} scored outer test rows"
        assert not (out / r["folder"] / "model").exists()
    # the final run is the chosen recipe, on the outer split, with its bundle
    chosen = next(r for r in rec["candidates"] if r["chosen"])
    final_cfg = (out / "final" / "config.toml").read_text()
    assert f'name = "{chosen["recipe"]["model.name"]}"' in final_cfg and "validation = false" in final_cfg
    assert (out / "final" / "model" / "bundle.json").is_file()
    assert json.loads((out / "final" / "metrics.json").read_text())["context"]["tune"]["chosen"] == rec["chosen"]
    assert "Recipe chosen by nested validation" in (out / "final" / "report.html").read_text()


def test_a_rerun_reads_the_finished_candidates_back(tuned, data_dir):
    from cellmorph.engine.tune import tune

    out, m = tuned
    stamps = {p: p.stat().st_mtime_ns for p in (out / "candidates").rglob("predictions.parquet") if "folds" in p.parts}
    assert stamps, "no fold files to compare"
    again = tune(load_config(QUICKSTART, SMALL), out, data_dir, budget_min=45, only=CHEAP)
    assert again.context["tune"]["chosen"] == m.context["tune"]["chosen"]
    assert again.level("image").correct == m.level("image").correct
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_the_budget_skips_later_candidates_and_says_why(data_dir, tmp_path):
    from cellmorph.engine.tune import tune

    m = tune(load_config(QUICKSTART, SMALL + ["save_model=false"]), tmp_path / "t", data_dir, budget_min=0.001, only=CHEAP)
    first, second = m.context["tune"]["candidates"]
    assert first["status"] == "ran" and first["chosen"]
    assert second["status"].startswith("skipped:") and "budget" in second["status"] and not second["chosen"]
    assert not (tmp_path / "t" / "candidates" / "resnet18-scratch").exists()


def test_refusals_name_the_fix(data_dir, tmp_path):
    from cellmorph.engine.tune import candidates, tune

    with pytest.raises(CellmorphError, match="single-split protocol"):
        tune(load_config(QUICKSTART), tmp_path / "a", data_dir)
    with pytest.raises(CellmorphError, match="unknown candidate"):
        tune(load_config(QUICKSTART, SMALL), tmp_path / "b", data_dir, only=["vgg99"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    cfg = load_config(QUICKSTART, SMALL)
    big = candidates(cfg, 256)  # 2x would pass the 224 cap: one fine-tuning scale only
    assert "finetune-2x" not in big and big["finetune-1x"]["model.input_size"] == 224
    small = candidates(cfg, 32)
    assert (small["finetune-1x"]["model.input_size"], small["finetune-2x"]["model.input_size"]) == (32, 64)
    assert small["lenet-scratch"]["model.input_size"] == 64 and small["frozen"]["frozen.C"] == "auto"
    # every trained candidate is scored (and its bundle predicts) with the 8 dihedral views it was trained on
    assert all(bool(v.get("finetune.tta")) is (v["mode"] == "finetune") for v in small.values())
    # a from-scratch config's frozen candidate is the ImageNet Lite0 with stage features; its own network is kept when pretrained
    scratch = candidates(load_config(QUICKSTART, SMALL + ["model.name=lenet", "model.init=xavier"]), 32)["frozen"]
    assert (scratch["model.name"], scratch["model.init"], scratch["frozen.features"]) == ("tf_efficientnet_lite0", "imagenet", "auto")
    assert "model.name" not in small["frozen"] and small["frozen"]["frozen.features"] == "auto"
    assert candidates(load_config(QUICKSTART, SMALL + ["model.name=alexnet"]), 32)["frozen"]["frozen.features"] == "last"


def test_cli_tune_help_and_refusal(data_dir, tmp_path):
    env = {**os.environ, "CELLMORPH_DATA": str(data_dir)}
    h = subprocess.run([sys.executable, "-m", "cellmorph", "tune", "--help"], capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "--budget-min" in h.stdout and "nested validation" in h.stdout
    r = subprocess.run([sys.executable, "-m", "cellmorph", "tune", str(QUICKSTART), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "single-split protocol" in r.stdout + r.stderr
    assert not (tmp_path / "x").exists()
