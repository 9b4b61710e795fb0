from pathlib import Path
"""End-to-end runs on the real BBBC021 subset: the quickstart, resume after SIGKILL, a CPU fine-tune."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from cellmorph.config import load_config, override
from cellmorph.engine.runner import cross_validate_config, run_experiment
from cellmorph.evaluation.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]

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
    t, i = m.level("treatment"), m.level("image")
    assert t.total == 55 and i.total == 660 and m.context["n_folds"] == 18
    # The quickstart's published numbers (seed 0, deterministic): 55/55 treatments, 573/660 images.
    assert (t.correct, i.correct) == (55, 573)
    assert 0 < i.balanced_accuracy <= 1 and 0 < i.macro_f1 <= 1 and set(i.per_class) == set(m.classes)
    # 144 images of Aurora kinase and Eg5 inhibitors, 72 of Cholesterol-lowering: 2x, weighted (frozen default)
    b = m.context["class_balance"]
    assert (b["ratio"], b["weighted"], b["images"]["Cholesterol-lowering"], sum(b["images"].values())) == (2.0, True, 72, 660)
    env = json.loads((out / "environment.json").read_text())
    # "cpu" when a network ran; "auto" when the features came from the cache and none had to run
    assert env["seeds"] == [0] and env["torch"] and env["device"] in ("cpu", "auto")
    assert json.loads((out / "dataset.json").read_text())["rows"] == 660


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
    resumed = Metrics.read(out / "metrics.json")
    assert resumed.levels == full.levels
    assert not list(out.rglob(".*.tmp-*"))


def test_rerun_with_other_config_is_refused(quickstart_run, data_dir, tmp_path):
    from cellmorph.errors import CellmorphError

    out, _ = quickstart_run
    cfg = override(load_config(QUICKSTART), {"seed": 1})
    with pytest.raises(CellmorphError, match="different config"):
        run_experiment(cfg, out, data_dir)


@pytest.mark.slow
def test_finetune_smoke_real_images(data_dir, tmp_path):
    out = tmp_path / "ft"
    m = run_experiment(load_config(REPO / "configs" / "finetune-cpu-smoke.toml"), out, data_dir)
    assert m.context["mode"] == "finetune" and m.context["n_folds"] == 2
    hist = json.loads((out / "folds" / "00" / "history.json").read_text())
    assert hist["epoch"] == [1] and hist["loss"][0] > 0
    pred = pd.read_parquet(out / "predictions.parquet")
    assert set(pred.fold_held_out) == {"AZ-A", "AZ-C"}  # the first two compounds in sorted order
    assert m.level("image").total == len(pred) == (pred.Metadata_Compound.isin(["AZ-A", "AZ-C"])).sum()
    for name in ("metrics.json", "confusion.png", "report.html", "treatments.csv"):
        assert (out / name).is_file()
    # the final model: fine-tuned once more on every labelled image, saved with the out-of-fold scores
    meta = json.loads((out / "model" / "bundle.json").read_text())
    assert meta["mode"] == "finetune" and meta["trained_on"]["images"] == 660 and meta["calibration"]["rows"] == len(pred)


def test_nuclei_run_folder_real(crchisto_table, data_dir, tmp_path):
    """A tiny nucleus run through the runner: no compounds, so per-nucleus accuracy and no treatments."""
    cfg = override(load_config(REPO / "configs" / "nuclei" / "transfer-image-grouped.toml"), {
        "device": "cpu", "dataset.options.max_images": 4, "model.name": "lenet", "model.init": "xavier", "finetune.epochs": 1,
        "finetune.eval_every_iterations": 50})
    out = tmp_path / "nuclei"
    m = run_experiment(cfg, out, data_dir)
    first4 = crchisto_table.df[crchisto_table.df.Metadata_ImageNumber <= 4]
    assert m.protocol == "image-grouped" and m.context["n_folds"] == 1 and m.classes == sorted(first4.Metadata_Label.unique())
    assert list(m.levels) == ["image"] and 0 <= m.level("image").accuracy <= 1
    assert m.context["aggregation"].startswith("none")
    # accuracy-vs-iteration curve: the untrained model, every 50 iterations, and the trained model last
    xs = [c["iteration"] for c in m.curve]
    assert xs[0] == 0 and xs == sorted(xs) and m.curve[-1]["image"] == m.level("image").accuracy
    pred = pd.read_parquet(out / "predictions.parquet")
    fold = json.loads((out / "folds" / "00" / "fold.json").read_text())
    assert len(pred) == m.level("image").total == fold["n_test"] and fold["n_train"] + fold["n_test"] == len(first4)
    assert pred.Metadata_Image.nunique() == 1  # one whole image held out of the 4
    assert not (out / "treatments.csv").exists()
    assert (out / "confusion.png").is_file() and (out / "report.html").is_file()


def test_lenet_lab_holdout_real(data_dir, tmp_path):
    """The lab's config (shrunk: 1 epoch, 64 px) on the 75/25 validation split."""
    cfg = override(load_config(REPO / "configs" / "lenet-lab.toml"), {"device": "cpu", "dataset.image_size": 64, "model.input_size": 64, "finetune.epochs": 1})
    m = run_experiment(cfg, tmp_path / "lenet", data_dir)
    assert m.protocol == "holdout-25" and m.level("image").total == 165 and m.context["model"] == "lenet"
    assert m.level("treatment").total > 40  # validation fields cover most treatments
    hist = json.loads((tmp_path / "lenet" / "folds" / "00" / "history.json").read_text())
    assert hist["epoch"] == [1] and hist["loss"][0] > 0


def test_cross_validate_in_memory_equals_run_folder(quickstart_run):
    """The API's in-memory cross-validation is the same runner: identical predictions and metrics."""
    out, m = quickstart_run
    res = cross_validate_config(load_config(QUICKSTART))
    assert res.metrics.levels == m.levels
    pd.testing.assert_frame_equal(res.predictions, pd.read_parquet(out / "predictions.parquet"), check_dtype=False)


def test_changed_data_is_refused_not_mixed(data_dir, tmp_path):
    """A run folder records the data it was computed from: after the data change, a rerun refuses
    instead of reporting old folds as done (here: the folder CSV loses rows)."""
    from cellmorph.errors import CellmorphError

    labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = labels[labels.compound.isin(["AZ-A", "AZ258", "AZ-C", "AZ138"])].groupby("compound").head(4)  # 2 MoAs x 2 compounds
    df = pd.DataFrame({"Image_Path_RGB": [str(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png") for i in rows.index],
                       "Metadata_Compound": rows.compound.to_numpy(), "Metadata_MoA": rows.moa.to_numpy()})
    csv = tmp_path / "images.csv"
    df.to_csv(csv, index=False)
    cfg = override(load_config(QUICKSTART), {"dataset.name": "folder", "dataset.options": {"csv": str(csv)}, "model.input_size": 64})
    out = tmp_path / "run"
    run_experiment(cfg, out, data_dir)
    df.iloc[:-2].to_csv(csv, index=False)
    with pytest.raises(CellmorphError, match="other data"):
        run_experiment(cfg, out, data_dir)


def test_failed_start_claims_nothing(data_dir, tmp_path):
    """A run that cannot start (a grouping column the data lack) leaves no folder and no config."""
    from cellmorph.errors import CellmorphError

    out = tmp_path / "never"
    cfg = override(load_config(QUICKSTART), {"evaluation.protocol": "logo", "evaluation.group": "Metadata_Patient"})
    with pytest.raises(CellmorphError, match="Metadata_Patient"):
        run_experiment(cfg, out, data_dir)
    assert not out.exists()


def test_only_own_temporaries_are_cleaned(quickstart_run, data_dir, tmp_path):
    """Resuming into a folder removes cellmorph's own stale temporaries, never a user's file; a run folder
    holding a user's files is refused whole (nothing touched)."""
    import shutil

    from cellmorph.errors import CellmorphError

    src, _ = quickstart_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    ours = out / "folds" / "00" / ".predictions.parquet.tmp-abc123"
    our_bundle = out / ".model.tmp-abc123" / "bundle.json"  # a killed save of the final model
    theirs_in_our_name = out / ".model.tmp-mine" / "notes.txt"  # looks like ours, holds a user's file: kept
    for f in (ours, our_bundle, theirs_in_our_name):
        f.parent.mkdir(exist_ok=True)
        f.write_text("x")
    users = [out / ".notes.txt.tmp-keep", out / "mine" / ".metrics.json.tmp-x1"]
    for f in users:
        f.parent.mkdir(exist_ok=True)
        f.write_text("x")
    with pytest.raises(CellmorphError, match="holds files cellmorph did not write"):
        run_experiment(load_config(QUICKSTART), out, data_dir)
    assert ours.exists() and our_bundle.exists() and all(f.exists() for f in (theirs_in_our_name, *users))  # refused: nothing touched
    for f in users:
        f.unlink()
    (out / "mine").rmdir()
    model_mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    run_experiment(load_config(QUICKSTART), out, data_dir)
    assert not ours.exists() and not our_bundle.parent.exists() and theirs_in_our_name.read_text() == "x"
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime  # resumed: the final model is kept, not refitted


def test_fold_renamed_by_another_attempt_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two attempts of one fold (a Ray retry; a killed driver's worker still finishing while the rerun computes
    the same fold): the other attempt renames its complete folder onto folds/NN between this one's check and
    its rename. The rename onto a non-empty folder fails; the other attempt's fold is kept, no error."""
    from cellmorph.engine import runfolder
    from cellmorph.storage import RUN, remove_own_folder

    final = tmp_path / "folds" / "03"
    ours, theirs = tmp_path / "folds" / ".03.tmp-ours", tmp_path / "folds" / ".03.tmp-theirs"
    for d in (ours, theirs):
        d.mkdir(parents=True)
        (d / "predictions.parquet").write_text(d.name)
    rename = os.rename

    def the_other_attempt_renames_first(src, dst):
        rename(theirs, final)
        rename(src, dst)

    monkeypatch.setattr(runfolder.os, "rename", the_other_attempt_renames_first)
    runfolder.move_fold_dir(ours, final)
    monkeypatch.undo()
    assert (final / "predictions.parquet").read_text() == ".03.tmp-theirs"
    remove_own_folder(ours, RUN.names)  # what FolderSink.save does with its temporary folder afterwards
    assert not ours.exists()


@pytest.mark.parametrize("protocol", ["logo", "group-kfold"])
def test_folder_dataset_grouped_by_patient_cli(data_dir, tmp_path, protocol):
    """Your own data: only image paths, a label and a patient column; grouped by that column through
    the CLI; accuracy, balanced accuracy and macro-F1 per image and per class, nothing about treatments."""
    labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = labels[labels.moa.isin(["Eg5 inhibitors", "Protein synthesis"])].groupby("plate").head(2)
    df = pd.DataFrame({"Image_Path_RGB": [str(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png") for i in rows.index],
                       "Metadata_Patient": rows.plate.to_numpy(), "Metadata_Label": rows.moa.to_numpy()})
    df.to_csv(tmp_path / "cells.csv", index=False)
    (tmp_path / "cfg.toml").write_text(f'name = "mine"\nmode = "frozen"\n[dataset]\nname = "folder"\nlabel = "Metadata_Label"\n'
                                       f'options = {{csv = "{tmp_path / "cells.csv"}"}}\n[model]\ninput_size = 32\n')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cellmorph", "run", str(tmp_path / "cfg.toml"), "--out", str(out), "--data", str(data_dir),
                           "--set", f"evaluation.protocol={protocol}", "--set", "evaluation.group=Metadata_Patient", "--set", "evaluation.n_splits=3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())  # the console writes to stderr
    assert "image accuracy" in said and "balanced" in said and "macro-F1" in said and "treatment" not in said
    m = Metrics.read(out / "metrics.json")
    assert list(m.levels) == ["image"] and m.level("image").total == len(df)
    assert set(m.level("image").per_class) == {"Eg5 inhibitors", "Protein synthesis"}
    assert m.context["n_folds"] == (df.Metadata_Patient.nunique() if protocol == "logo" else 3)
    pred = pd.read_parquet(out / "predictions.parquet")
    for _, g in pred.groupby("fold"):  # no patient on both sides: each fold's test patients are absent from its training
        assert g.fold_held_out.nunique() == 1
    report = (out / "report.html").read_text()
    assert "balanced" in report.lower() and "treatment" not in report.lower()


def test_missing_pretrained_weights_fail_before_the_folder_is_claimed(data_dir, tmp_path, monkeypatch):
    """No ImageNet weights for resnet50 offline: the error comes before config.toml is written, so the
    corrected config then runs in the same folder (it used to be refused as 'a different config')."""
    from cellmorph.errors import CellmorphError

    monkeypatch.delenv("CELLMORPH_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    out.mkdir()
    cfg = override(load_config(QUICKSTART), {"model.name": "resnet50"})
    with pytest.raises(CellmorphError, match="no ImageNet weights for 'resnet50'"):
        run_experiment(cfg, out, data_dir)
    assert list(out.iterdir()) == []


@pytest.mark.realdata
def test_finetune_from_disk_when_the_store_does_not_fit_equals_in_memory(data_dir, tmp_path, monkeypatch):
    """A store larger than the memory budget (forced with CELLMORPH_MEMORY_MB=0) is resized once onto disk by
    streaming and read batch by batch: the same folds give the same predictions, byte for byte."""
    sets = {"mode": "finetune", "dataset.image_size": 32, "model.input_size": 32, "finetune.epochs": 1, "finetune.batch_size": 16,
            "evaluation.max_folds": 1, "execution.threads": 1, "save_model": False, "device": "cpu"}
    cfg = override(load_config(QUICKSTART), sets)
    run_experiment(cfg, tmp_path / "memory", data_dir)
    monkeypatch.setenv("CELLMORPH_MEMORY_MB", "0")
    monkeypatch.setenv("CELLMORPH_CACHE", str(tmp_path / "cache"))  # a cold cache: nothing decoded in memory before
    run_experiment(cfg, tmp_path / "disk", data_dir)
    assert list((tmp_path / "cache").glob("store/*/resized-32.npy")) and not list((tmp_path / "cache").glob("store/*/images.npy"))
    for name in ("predictions.parquet", "folds/00/predictions.parquet"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes(), name
