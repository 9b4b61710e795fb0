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


def test_nuclei_run_folder_real(crchisto_table, data_dir, tmp_path):
    """A tiny nucleus run through the runner: no compounds, so per-nucleus accuracy and no treatments."""
    cfg = load_config(REPO / "configs" / "nuclei-transfer.toml")
    cfg = cfg.model_copy(
        update={
            "device": "cpu",
            "dataset": cfg.dataset.model_copy(update={"options": {"patch_size": 32, "max_images": 4}}),
            "model": cfg.model.model_copy(update={"name": "lenet", "init": "xavier"}),
            "finetune": cfg.finetune.model_copy(update={"epochs": 1}),
            "evaluation": cfg.evaluation.model_copy(update={"protocol": "image-grouped"}),
        }
    )
    out = tmp_path / "nuclei"
    m = run_experiment(cfg, out, data_dir)
    first4 = crchisto_table.df[crchisto_table.df.Metadata_ImageNumber <= 4]
    assert m["protocol"] == "image-grouped" and m["n_folds"] == 1 and m["classes"] == sorted(first4.Metadata_Label.unique())
    assert 0 <= m["image_accuracy_image-grouped"] <= 1 and not any(k.startswith("treatment") for k in m)
    assert m["aggregation"].startswith("none")
    pred = pd.read_parquet(out / "predictions.parquet")
    fold = json.loads((out / "folds" / "00" / "fold.json").read_text())
    assert len(pred) == m["images_total"] == fold["n_test"] and fold["n_train"] + fold["n_test"] == len(first4)
    assert pred.Metadata_Image.nunique() == 1  # one whole image held out of the 4
    assert not (out / "treatments.csv").exists()
    assert (out / "confusion.png").is_file() and "no compounds" in (out / "report.html").read_text()


def test_lenet_lab_holdout_real(data_dir, tmp_path):
    """The lab's config (shrunk: 1 epoch, 64 px) on the 75/25 validation split."""
    cfg = load_config(REPO / "configs" / "lenet-lab.toml")
    cfg = cfg.model_copy(
        update={
            "device": "cpu",
            "dataset": cfg.dataset.model_copy(update={"image_size": 64}),
            "model": cfg.model.model_copy(update={"input_size": 64}),
            "finetune": cfg.finetune.model_copy(update={"epochs": 1}),
        }
    )
    m = run_experiment(cfg, tmp_path / "lenet", data_dir)
    assert m["protocol"] == "holdout-25" and m["images_total"] == 165 and m["model"] == "lenet"
    assert "treatment_accuracy_holdout-25" in m and m["treatments_total"] > 40  # validation fields cover most treatments
    hist = json.loads((tmp_path / "lenet" / "folds" / "00" / "history.json").read_text())
    assert hist["epoch"] == [1] and hist["loss"][0] > 0
