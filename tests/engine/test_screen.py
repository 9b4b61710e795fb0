"""Screens (cellmorph.engine.screen): shards by plate, outputs kept per shard, a killed predict resumes with the
shards it had (in-process interruption and a real SIGKILL), a changed file makes its shard new work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmorph.engine import screen
from cellmorph.engine.screen import plan_shards, shard_fingerprint


def test_shards_follow_plates_and_a_size_limit():
    df = pd.DataFrame({"Metadata_Plate": ["a"] * 5 + ["b"] * 2 + ["a"]})
    shards = plan_shards(df, max_rows=3)
    assert [s.name for s in shards] == ["plate a (1/2)", "plate a (2/2)", "plate b"]
    assert [list(s.rows) for s in shards] == [[0, 1, 2], [3, 4, 7], [5, 6]]
    assert [s.name for s in plan_shards(pd.DataFrame({"x": range(5)}), max_rows=2)] == ["rows 0-1", "rows 2-3", "rows 4-4"]



def test_interrupted_predict_resumes_with_its_finished_shards(screen_world, tmp_path, monkeypatch, capsys, cli):
    monkeypatch.setenv("CELLMORPH_SHARD_ROWS", "8")
    monkeypatch.setenv("CELLMORPH_CACHE", str(tmp_path / "cache"))
    bundle, csv = screen_world / "bundle", screen_world / "load_data.csv"
    code, text = cli(monkeypatch, capsys, "predict", bundle, csv, "--out", tmp_path / "whole")
    assert code == 0, text
    assert not list((tmp_path / "cache").glob("screens/*/*.npz"))  # a finished job leaves no shard behind

    real, calls = screen._write_shard, []

    def dies_at_the_fourth(*args, **kw):  # frozen models score the shards as one stream: stop at a shard's end
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of the screen
        return real(*args, **kw)

    monkeypatch.setattr(screen, "_write_shard", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        from cellmorph.prediction.predict import predict_images

        predict_images(bundle, csv, tmp_path / "again")
    assert not (tmp_path / "again").exists()  # the output appears whole or not at all
    assert len(list((tmp_path / "cache").glob("screens/*/*.npz"))) == 3
    monkeypatch.setattr(screen, "_write_shard", real)
    calls.clear()
    code, text = cli(monkeypatch, capsys, "predict", bundle, csv, "--out", tmp_path / "again")
    assert code == 0 and "resuming: 3 of" in text, text
    a, b = pd.read_parquet(tmp_path / "whole" / "predictions.parquet"), pd.read_parquet(tmp_path / "again" / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_frozen_shards_streamed_as_one_equal_shard_by_shard(screen_world, monkeypatch):
    """The frozen path scores all shards as one stream (decoding runs on across plate ends, several batches at once
    on the cores); every shard's outputs are the bytes `score_shard` gives it alone (what a Ray task computes)."""
    from cellmorph.data.inputs import read_images
    from cellmorph.models.classifier import Classifier

    clf = Classifier.load(screen_world / "bundle")
    table = read_images(screen_world / "load_data.csv")
    shards = plan_shards(table.df, max_rows=5)  # short shards: a batch never spans two
    got: dict = {}
    screen.score_shards_streamed(clf, table, 0, shards, features=True, quality=True, finished=lambda s, out: got.setdefault(s.index, out))
    assert sorted(got) == [s.index for s in shards]
    for s in shards:
        alone = screen.score_shard(clf, table, 0, s, features=True, quality=True)
        assert got[s.index].keys() == alone.keys() and {"probs", "features", "qc_focus"} <= alone.keys()
        for k in alone:
            assert np.array_equal(got[s.index][k], alone[k]), (s.name, k)


def test_a_changed_file_changes_its_shard_fingerprint(screen_world, tmp_path):
    from cellmorph.data.inputs import read_images

    csv = pd.read_csv(screen_world / "load_data.csv")
    target = tmp_path / "field.png"
    target.write_bytes(Path(csv["Image_PathName_RGB"].iloc[0], csv["Image_FileName_RGB"].iloc[0]).read_bytes())
    csv.loc[0, "Image_PathName_RGB"] = str(tmp_path)
    csv.loc[0, "Image_FileName_RGB"] = "field.png"
    csv.to_csv(tmp_path / "load.csv", index=False)
    table = read_images(tmp_path / "load.csv")
    first = plan_shards(table.df, max_rows=8)[0]
    before = shard_fingerprint(table, first)
    st = os.stat(target)
    target.write_bytes(target.read_bytes())  # the same bytes, rewritten: ctime moves, so the shard is new work
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard_fingerprint(table, first) != before


def test_sigkilled_predict_leaves_no_output_and_resumes(screen_world, tmp_path, monkeypatch, capsys, cli):
    """A real SIGKILL in the middle of a streaming predict: --out is absent (never half-written), the finished shards
    stay in the cache, and the same command resumes with them."""
    cache = tmp_path / "cache"
    env = {**os.environ, "CELLMORPH_SHARD_ROWS": "4", "CELLMORPH_CACHE": str(cache)}
    out = tmp_path / "pred"
    n = len(pd.read_csv(screen_world / "load_data.csv"))
    total = len(plan_shards(pd.read_csv(screen_world / "load_data.csv"), max_rows=4))
    args = [sys.executable, "-m", "cellmorph", "predict", str(screen_world / "bundle"), str(screen_world / "load_data.csv"), "--out", str(out),
            "--threads", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # A shard counts once its digest is beside it: the kill may land between the shard's rename and its digest,
    # and such a shard is (rightly) scored again.
    while time.time() < deadline and len(list(cache.glob("screens/*/*.npz.blake2b"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(cache.glob("screens/*/*.npz.blake2b")))
    assert 2 <= kept < total, (kept, total)  # killed in the middle
    assert not out.exists() and not list(tmp_path.glob(".pred.tmp-*"))
    monkeypatch.setenv("CELLMORPH_SHARD_ROWS", "4")
    monkeypatch.setenv("CELLMORPH_CACHE", str(cache))
    code, text = cli(monkeypatch, capsys, "predict", screen_world / "bundle", screen_world / "load_data.csv", "--out", out, "--threads", "1")
    assert code == 0 and f"resuming: {kept} of {total}" in text, text
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == n and np.allclose(pred.filter(like="prob_").sum(axis=1), 1, atol=1e-5)
