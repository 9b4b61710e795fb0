"""The storage layer (cellmorph.storage), tested directly and through the CLI: the one owner of every folder
cellmorph writes refuses a user's folder, locks out a second process naming the holder, writes folders whole,
and after a SIGKILL at any commit point leaves nothing of its own behind once the next command has run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cellmorph.errors import CellmorphError
from cellmorph.storage import BUNDLE, PREDICT, RUN, claim, clean_temporaries, foreign_entries, lock_holder, locked, staged_folder


def test_claim_refuses_a_folder_holding_a_users_file_and_names_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("cellmorph's name")
    (out / "my notes.txt").write_text("mine")
    with pytest.raises(CellmorphError, match=r"holds files cellmorph did not write \(e\.g\. my notes\.txt\)"):
        claim(out, RUN)
    assert (out / "my notes.txt").read_text() == "mine"
    os.remove(out / "my notes.txt")
    assert claim(out, RUN) == out  # only cellmorph's names left: ours


def test_claim_knows_own_subfolders_and_refuses_unknown_ones(tmp_path):
    out = tmp_path / "run"
    (out / "folds" / "00").mkdir(parents=True)
    (out / "folds" / "00" / "predictions.parquet").write_text("x")
    (out / "model").mkdir()
    (out / "model" / "bundle.json").write_text("{}")
    assert foreign_entries(out, RUN) == []
    (out / "folds" / "00" / "plot.svg").write_text("a user's")
    assert foreign_entries(out, RUN) == [out / "folds" / "00" / "plot.svg"]


def test_an_earlier_output_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "pred"
    with staged_folder(out, PREDICT) as tmp:
        (tmp / "predict.json").write_text("first")
    with pytest.raises(CellmorphError, match="a predict output already exists there.*Pass --overwrite"):
        claim(out, PREDICT, overwrite=False)
    claim(out, PREDICT, overwrite=True)
    with staged_folder(out, PREDICT) as tmp:
        (tmp / "predict.json").write_text("second")
    assert (out / "predict.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no temporary, no set-aside copy


def test_a_failed_staged_folder_leaves_the_old_one_whole(tmp_path):
    out = tmp_path / "bundle"
    with staged_folder(out, BUNDLE) as tmp:
        (tmp / "bundle.json").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out, BUNDLE) as tmp:
        (tmp / "bundle.json").write_text("new, half")
        raise RuntimeError("killed mid-write")
    assert (out / "bundle.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_cleanup_removes_only_our_temporaries(tmp_path):
    out = tmp_path / "run"
    (out / "folds").mkdir(parents=True)
    ours = [out / ".metrics.json.tmp-abc", out / "folds" / ".03.tmp-x1" / "fold.json", tmp_path / ".run.tmp-zz" / "config.toml",
            out / ".model.tmp-q" / "model.safetensors"]
    theirs = [out / ".notes.tmp-1", tmp_path / ".run.tmp-zz2" / "thesis.docx", out / ".model.tmp-r" / "my.txt"]
    for f in ours + theirs:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    removed = clean_temporaries(out, RUN)
    for f in ours:
        assert not f.exists(), f
    for f in theirs:
        assert f.read_text() == "x", f
    assert {p.name for p in removed} >= {".metrics.json.tmp-abc", ".03.tmp-x1", ".run.tmp-zz", ".model.tmp-q"}


_HOLD = "import sys, time\nfrom cellmorph.storage import locked\nwith locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def test_second_process_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(out).startswith(f"pid {holder.pid} since ")
        with pytest.raises(CellmorphError, match=rf"--out {out} is in use by another cellmorph process \(pid {holder.pid} since "):
            with locked(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel releases the lock
        holder.wait()
    assert lock_holder(out) is None
    with locked(out):
        assert lock_holder(out).startswith(f"pid {os.getpid()} since ")
    assert not (tmp_path / ".out.lock").exists()


# --- SIGKILL at every commit point ------------------------------------------------------------------------


# Patches os.replace and os.rename (every commit point of cellmorph's writers) to SIGKILL the process at the
# KILL_AT-th call (0: never); run in a forked child by _killed_at.
_KILL_AT_NTH_RENAME = """
import os, signal
_seen = [0]
def _counted(real):
    def f(*a, **k):
        _seen[0] += 1
        if _seen[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return f
os.replace, os.rename = _counted(os.replace), _counted(os.rename)
"""

def _killed_at(n: int, work) -> int:
    """Run `work()` in a forked child that SIGKILLs itself at its n-th rename (n = 0: never). Returns the child's
    status: -SIGKILL when killed, 0 when `work` finished first, 3 when it raised."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of the parent's runs (os._exit), nothing shared but the files
        try:
            exec(_KILL_AT_NTH_RENAME, {"KILL_AT": n})
            work()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - reported to the parent by the exit status
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _ours_left(folder: Path) -> list[str]:
    """Temporaries of cellmorph's writers (and any safetensors temporary) and lock files, in and beside `folder`."""
    found = []
    for p in [*folder.parent.iterdir(), *(folder.rglob("*") if folder.is_dir() else [])]:
        if ".tmp-" in p.name or ".old-" in p.name or p.name.startswith("tmp") or p.name.endswith(".lock"):
            found.append(str(p.relative_to(folder.parent)))
    return found


@pytest.mark.slow
@pytest.mark.realdata
def test_sigkill_at_every_rename_leaves_nothing_after_the_next_command(data_dir, tmp_path, monkeypatch):
    """A tiny frozen run with its final model (cached features: no torch in the forked children), killed at
    its 1st, 2nd, ... rename (every commit point: atomic files, fold folders, the bundle swap), then run
    again; then a predict (`cellmorph predict`'s function) killed at each of its renames (the predict folder's
    swap), then run again. After each rerun, no temporary of ours (or of safetensors) and no lock is left, and the results
    equal an uninterrupted run's."""
    import pandas as pd

    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment

    labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = []
    for c in ("AZ841", "AZ258", "AZ-C", "AZ138"):
        for i, r in labels[labels["compound"] == c].head(3).iterrows():
            rows.append({"Image_Path_RGB": str(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png"), "Metadata_MoA": r["moa"],
                         "Metadata_Compound": c, "Metadata_Concentration": r["concentration"], "Metadata_Plate": r["plate"], "Metadata_Well": r["well"]})
    pd.DataFrame(rows).to_csv(tmp_path / "images.csv", index=False)
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text('name = "tiny"\nmode = "frozen"\ndevice = "cpu"\nsave_model = true\n[dataset]\nname = "folder"\nimage_size = 32\n'
                        f'options = {{csv = "{tmp_path / "images.csv"}"}}\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n')
    monkeypatch.setenv("CELLMORPH_CACHE", str(tmp_path / "cache"))
    cfg = load_config(cfg_path)
    ref = tmp_path / "ref"
    run_experiment(cfg, ref / "run", tmp_path)  # fills the feature cache: the children never import torch
    want = (ref / "run" / "treatments.csv").read_text()
    n = 1
    while (code := _killed_at(n, lambda: run_experiment(cfg, tmp_path / f"run-{n}" / "run", tmp_path))) != 0:
        out = tmp_path / f"run-{n}" / "run"
        assert code == -signal.SIGKILL, (n, code)
        assert _killed_at(0, lambda: run_experiment(cfg, out, tmp_path)) == 0, n  # the next command completes the work ...
        assert _ours_left(out) == [], (n, _ours_left(out))  # ... and leaves nothing of ours behind
        assert (out / "treatments.csv").read_text() == want, n
        n += 1
    assert n > 10, n  # a run renames: the kill points were real

    from cellmorph.prediction.predict import predict_images

    def predict(out):
        import torch

        torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited from the parent is used
        predict_images(ref / "run" / "model", tmp_path / "images.csv", out, overwrite=True)

    n, rerun = 1, []
    while (code := _killed_at(n, lambda: predict(tmp_path / f"pred-{n}"))) != 0:
        out = tmp_path / f"pred-{n}"
        assert code == -signal.SIGKILL, (n, code)
        assert _killed_at(0, lambda: predict(out)) == 0, n
        assert _ours_left(out) == [], (n, _ours_left(out))
        rerun.append(out)
        n += 1
    assert n > 1, n
    want_pred = pd.read_parquet(tmp_path / f"pred-{n}" / "predictions.parquet")  # the call that ran to the end, never killed
    for out in rerun:
        pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), want_pred)
