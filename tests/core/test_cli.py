from pathlib import Path
"""Bad input through the CLI: one clear message naming the file/field and the fix, exit 2, no
traceback, nothing half-written."""

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from cellmorph.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["cellmorph", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    return e.value.code, text


def _config(tmp_path, body: str):
    p = tmp_path / "exp.toml"
    p.write_text(body)
    return p


def _assert_clean_failure(code, text, *needles):
    assert code == 2, text
    assert "Traceback" not in text
    assert "error:" in text, text
    for n in needles:
        assert n in text, (n, text)


def _no_results(out):
    assert not out.exists() or not any(out.rglob("*.*")), list(out.rglob("*"))


def test_unknown_dataset(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, '[dataset]\nname = "bbbc0021"\n')
    code, text = _run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "o", "--data", tmp_path)
    _assert_clean_failure(code, text, "unknown dataset 'bbbc0021'", "dataset.name", "bbbc021-subset")
    _no_results(tmp_path / "o")


def test_unknown_model(data_dir, tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, '[model]\nname = "resnet5O"\n')
    code, text = _run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "o", "--data", data_dir)
    _assert_clean_failure(code, text, "unknown model 'resnet5O'", "model.name")
    _no_results(tmp_path / "o")


def test_missing_data_folder(tmp_path, monkeypatch, capsys):
    code, text = _run_cli(monkeypatch, capsys, "run", REPO / "configs" / "quickstart.toml", "--out", tmp_path / "o", "--data", tmp_path / "nope")
    _assert_clean_failure(code, text, str(tmp_path / "nope"), "does not exist", "CELLMORPH_DATA")
    _no_results(tmp_path / "o")


def test_labels_missing_column(data_dir, tmp_path, monkeypatch, capsys):
    sub = tmp_path / "data" / "bbbc021-subset"
    sub.mkdir(parents=True)
    raw = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0).drop(columns=["plate"])
    raw.to_csv(sub / "bbbc021v1_labels.csv", sep=";")
    code, text = _run_cli(monkeypatch, capsys, "run", REPO / "configs" / "quickstart.toml", "--out", tmp_path / "o", "--data", tmp_path / "data")
    _assert_clean_failure(code, text, "bbbc021v1_labels.csv", "missing column(s) ['plate']")
    _no_results(tmp_path / "o")


def test_corrupt_image_stops_before_writing(data_dir, tmp_path, monkeypatch, capsys):
    """A real subset copy with one truncated PNG: the error names it and no run output or store is left."""
    sub = tmp_path / "data" / "bbbc021-subset"
    shutil.copytree(data_dir / "bbbc021-subset", sub)
    bad = sub / "images" / "bbbc021v1_17.png"
    bad.write_bytes(bad.read_bytes()[:500])
    cache = tmp_path / "cache"
    monkeypatch.setenv("CELLMORPH_CACHE", str(cache))
    code, text = _run_cli(monkeypatch, capsys, "run", REPO / "configs" / "quickstart.toml", "--out", tmp_path / "o", "--data", tmp_path / "data")
    _assert_clean_failure(code, text, "bbbc021v1_17.png", "corrupt or truncated")
    _no_results(tmp_path / "o")
    assert not list(cache.rglob("*.npy"))


def test_config_typo_and_wrong_type(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, '[frozen]\ntta = true\nCc = 2\n')
    code, text = _run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "o")
    _assert_clean_failure(code, text, str(cfg), "frozen.Cc", "unknown field")
    cfg = _config(tmp_path, 'seed = "zero"\n')
    code, text = _run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "o")
    _assert_clean_failure(code, text, "seed", "integer")


def test_output_folder_not_writable(data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    code, text = _run_cli(monkeypatch, capsys, "run", REPO / "configs" / "quickstart.toml", "--out", blocker / "run", "--data", data_dir)
    _assert_clean_failure(code, text, str(blocker), "--out")
    assert blocker.read_text() == "I am a file, not a folder"


def test_entry_point_help_and_error_exit():
    """The installed console script: --help for every verb, and a real process's exit code."""
    exe = shutil.which("cellmorph") or None
    cmd = [exe] if exe else [sys.executable, "-m", "cellmorph"]
    top = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "run" in top.stdout and "download" in top.stdout
    sub = subprocess.run([*cmd, "run", "--help"], capture_output=True, text=True)
    assert "--out" in sub.stdout and "--data" in sub.stdout and "resume" in sub.stdout
    bad = subprocess.run([*cmd, "run", "/no/such/config.toml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "config file not found" in bad.stderr and "Traceback" not in bad.stderr
