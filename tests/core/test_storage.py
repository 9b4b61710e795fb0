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
#
# The kills run in a small Python process of their own (the driver below): each kill point is a fork of it,
# and forking this test session's large process 80 times would cost more than the work itself.

DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.mark.slow
@pytest.mark.realdata
def test_sigkill_at_every_rename_leaves_nothing_after_the_next_command(data_dir, tmp_path):
    """A tiny frozen run with its final model (cached features: no torch in the forked children), killed at its
    1st, 2nd, ... rename (every commit point: atomic files, fold folders, the bundle swap), then run again; then a
    predict (`cellmorph predict`'s function) killed at each of its renames (the predict folder's swap), then run
    again. After each rerun, no temporary of ours (or of safetensors) and no lock is left, and the results equal
    an uninterrupted run's: tests/core/kill_driver.py asserts each and prints the kill points it tried."""
    env = {**os.environ, "CELLMORPH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(DRIVER), str(data_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(line.split(": ") for line in proc.stdout.splitlines() if "kill points" in line)
    assert int(counts["run kill points"]) > 10 and int(counts["predict kill points"]) >= 1, proc.stdout
