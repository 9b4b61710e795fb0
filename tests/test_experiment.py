"""End-to-end runs on the real BBBC021 subset: the quickstart, resume after SIGKILL, a CPU fine-tune."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from cellmorph.config import load_config
from cellmorph.experiment import run_experiment
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.toml"


@pytest.fixture(scope="session")
def quickstart_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    metrics = run_experiment(load_config(QUICKSTART), out, data_dir)
    return out, metrics


def test_quickstart_run_folder(quickstart_run):
    out, m = quickstart_run
    for name in ("config.toml", "environment.json", "predictions.parquet", "treatments.csv", "metrics.json", "confusion.png", "report.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "folds").iterdir())) == 18
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == 660 and pred.fold.nunique() == 18
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]]
    assert probs.shape[1] == 6 and ((probs.sum(axis=1) - 1).abs() < 1e-6).all()
    # every test compound was held out of its own fold's training
    assert (pred.groupby("Metadata_Compound").fold_held_out.first() == pred.groupby("Metadata_Compound").Metadata_Compound.first()).all()
    assert m["treatments_total"] == 55 and m["images_total"] == 660 and m["n_folds"] == 18
    # Far above chance (1/6); the benchmark measures the exact figure.
    assert m["treatment_accuracy_loco"] >= 0.8 and m["image_accuracy_loco"] >= 0.6
    env = json.loads((out / "environment.json").read_text())
    assert env["seed"] == 0 and env["torch"] and env["device"] == "cpu"


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cellmorph", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_gives_same_metrics(quickstart_run, data_dir, tmp_path):
    _, full = quickstart_run
    out = tmp_path / "killed"
    proc = _cli("run", str(QUICKSTART), "--out", str(out), "--data", str(data_dir))
    first = out / "folds" / "00" / "predictions.parquet"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file(), proc.stderr.read()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    done = sorted(p.parent.name for p in (out / "folds").glob("*/predictions.parquet"))
    assert 1 <= len(done) < 18
    pd.read_parquet(first)  # a whole file, not a half-written one

    rerun = _cli("run", str(QUICKSTART), "--out", str(out), "--data", str(data_dir))
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert f"{len(done)} of 18 folds already done" in " ".join(err.split())
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("treatment_accuracy_loco", "image_accuracy_loco", "treatments_correct", "images_correct", "misclassified_treatments"):
        assert resumed[key] == full[key], key
    assert not list(out.rglob(".*.tmp-*"))


def test_rerun_with_other_config_is_refused(quickstart_run, data_dir, tmp_path):
    from cellmorph.errors import CellmorphError

    out, _ = quickstart_run
    cfg = load_config(QUICKSTART).model_copy(update={"seed": 1})
    with pytest.raises(CellmorphError, match="different config"):
        run_experiment(cfg, out, data_dir)


@pytest.mark.slow
def test_finetune_smoke_real_images(data_dir, tmp_path):
    out = tmp_path / "ft"
    m = run_experiment(load_config(REPO / "configs" / "finetune-cpu-smoke.toml"), out, data_dir)
    assert m["mode"] == "finetune" and m["n_folds"] == 2
    hist = json.loads((out / "folds" / "00" / "history.json").read_text())
    assert hist["epoch"] == [1] and hist["loss"][0] > 0
    pred = pd.read_parquet(out / "predictions.parquet")
    assert set(pred.fold_held_out) == {"AZ-A", "AZ-C"}  # the first two compounds in sorted order
    assert m["images_total"] == len(pred) == (pred.Metadata_Compound.isin(["AZ-A", "AZ-C"])).sum()
    for name in ("metrics.json", "confusion.png", "report.html", "treatments.csv"):
        assert (out / name).is_file()
