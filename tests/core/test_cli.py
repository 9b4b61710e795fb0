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


def _error_line(monkeypatch, capsys, *args) -> str:
    """`cellmorph ARGS` in-process: exit 2, no traceback, and the one `error:` line it printed."""
    monkeypatch.setattr(sys, "argv", ["cellmorph", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_config_errors_name_the_file_that_holds_the_bad_line(tmp_path, monkeypatch, capsys):
    """An unknown key or a wrong type in a `base = ...` file is reported against that file, not the child
    that names it; errors in several files of a chain name each its own file."""
    (tmp_path / "shared").mkdir()
    grand = tmp_path / "shared" / "lab.toml"
    base = tmp_path / "shared" / "base.toml"
    child = tmp_path / "exp.toml"
    grand.write_text('name = "lab"\n[frozen]\nC = 0.5\n')
    base.write_text('base = "lab.toml"\nseed = 1\n[frozen]\nCc = 2\n')  # the typo is here
    child.write_text('base = "shared/base.toml"\nname = "exp"\n[frozen]\ntta = true\n')
    line = _error_line(monkeypatch, capsys, "run", child, "--out", tmp_path / "o")
    assert line.startswith(f"error: {base}: invalid configuration") and "unknown field 'frozen.Cc'" in line, line
    assert str(child) not in line, line

    base.write_text('base = "lab.toml"\nseed = "one"\n')  # a wrong type, here
    line = _error_line(monkeypatch, capsys, "run", child, "--out", tmp_path / "o")
    assert line.startswith(f"error: {base}: invalid configuration") and "field 'seed'" in line and "integer" in line, line
    assert str(child) not in line, line

    grand.write_text('name = "lab"\n[frozen]\nC = "strong"\n')  # and one two files up, and one in the child
    child.write_text('base = "shared/base.toml"\nname = "exp"\n[evaluation]\nprotocl = "loco"\n')
    line = _error_line(monkeypatch, capsys, "run", child, "--out", tmp_path / "o")
    for path, field in ((child, "'evaluation.protocl'"), (base, "'seed'"), (grand, "'frozen.C'")):
        assert f"{path}: " in line and field in line, (path, line)
    assert line.index(f"{base}: ") < line.index("'seed'") < line.index(f"{grand}: ") < line.index("'frozen.C'"), line
    assert not (tmp_path / "o").exists()


def test_help_names_the_ray_extra():
    """Help text is plain text: the [ray] of the extra is not eaten as markup (issue 24, item 7)."""
    from typer.testing import CliRunner

    from cellmorph.cli import app

    for verb in ("run", "predict", "embed"):
        res = CliRunner().invoke(app, [verb, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "pip install 'cellmorph[ray]'" in " ".join(res.output.split()), (verb, res.output)
