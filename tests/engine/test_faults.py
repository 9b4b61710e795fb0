"""Fault injection through the real CLI (`python -m cellmorph ...` in a subprocess), the way a user meets
each fault: exit 2 (130 for Ctrl-C), ONE line naming the file or field and the fix, no traceback, and the
output folder left sound: nothing half-written, and nothing that is not cellmorph's own deleted (every
--out folder starts with a user's `keep.txt` and `.notes.tmp-1`, which must survive).

The runs are tiny: 24 images of the real BBBC021 subset in a folder-dataset CSV (6 compounds, 3 MoAs),
frozen tf_efficientnet_lite0 at 32 x 32 px, and a 3-well cut of the real BBBC013 plate for `prepare`.
docs/guarantees.md points at these tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.cli import INTERRUPTED, TERMINATED

REPO = Path(__file__).resolve().parents[2]
USER_FILES = {"keep.txt": "my notes\n", ".notes.tmp-1": "an editor's swap file, not cellmorph's\n"}
COMPOUNDS = {  # 3 MoAs x 2 compounds x 4 images
    "Aurora kinase inhibitors": ["AZ841", "AZ258"],
    "Eg5 inhibitors": ["AZ-C", "AZ138"],
    "Protein synthesis": ["anisomycin", "emetine"],
}
TINY = """name = "tiny"
mode = "frozen"
device = "cpu"

[dataset]
name = "folder"
image_size = 32
options = {{csv = "{csv}"}}

[model]
name = "tf_efficientnet_lite0"
init = "imagenet"
input_size = 32

[evaluation]
protocol = "loco"
"""


# --- helpers -------------------------------------------------------------------------------------------------


class World:
    """The module's shared files: data folders, configs, a cache, and the reference run."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.shared = root, data_dir
        self.cache = root / "cache"
        self.data = root / "data"
        self.env = {**os.environ, "CELLMORPH_CACHE": str(self.cache), "CELLMORPH_DATA": str(self.data), "PYTHONPATH": str(REPO / "src")}
        self.data.mkdir()
        labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
        rows = []
        for moa, compounds in COMPOUNDS.items():
            for c in compounds:
                for i, r in labels[labels["compound"] == c].head(4).iterrows():
                    rows.append({
                        "Image_Path_RGB": str(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png"),
                        "Metadata_MoA": moa, "Metadata_Compound": c, "Metadata_Concentration": r["concentration"],
                        "Metadata_Plate": r["plate"], "Metadata_Well": r["well"],
                    })
        self.rows = pd.DataFrame(rows)
        self.rows.to_csv(self.data / "images.csv", index=False)
        self.config = self.write_config("tiny.toml", "images.csv")

    def write_config(self, name: str, csv: str, extra: str = "") -> Path:
        p = self.root / name
        p.write_text(TINY.format(csv=csv) + extra)
        return p

    def csv(self, name: str, df: pd.DataFrame) -> str:
        df.to_csv(self.data / name, index=False)
        return name


def cli(world: World, *args, env: dict | None = None, timeout: int = 300) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "cellmorph", *map(str, args)], capture_output=True, text=True,
                          env={**world.env, **(env or {})}, timeout=timeout, cwd=world.root)
    return proc.returncode, (proc.stdout + proc.stderr)


def cli_here(world: World, monkeypatch, capsys, *args) -> tuple[int, str]:
    """The same CLI call in this process (`cellmorph.cli.main`): no interpreter start-up, for the cases whose
    fault is not a process-level one (signals, kills)."""
    from cellmorph.cli import main

    for k in ("CELLMORPH_CACHE", "CELLMORPH_DATA"):
        monkeypatch.setenv(k, world.env[k])
    monkeypatch.chdir(world.root)
    monkeypatch.setattr(sys, "argv", ["cellmorph", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out + captured.err


def error_line(code: int, text: str, *needles: str, only_line: bool = True) -> str:
    """Exit 2, no traceback, exactly one `error:` line holding every needle (and, before any work is done,
    nothing else printed at all)."""
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, text
    if only_line:
        assert lines == errors, text
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@contextmanager
def holding(world: World, folder: Path):
    """Another process holding `folder`'s lock (as a running cellmorph command would) for the block; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cellmorph.storage import locked\n"
                               "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(folder)],
                              stdout=subprocess.PIPE, text=True, env=world.env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def with_user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in USER_FILES.items():
        (folder / name).write_text(body)
    return folder


def beside_user_files(folder: Path) -> Path:
    """A run folder path whose parent holds the user's files (a run folder itself must hold only
    cellmorph's files: one holding a user's is refused, test_run_into_a_folder_of_user_files_is_refused)."""
    with_user_files(folder.parent)
    return folder


def assert_user_files(folder: Path) -> None:
    for name, body in USER_FILES.items():
        assert (folder / name).read_text() == body, name


def cellmorph_files(folder: Path) -> list[str]:
    """Everything in `folder` but the user's files."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in USER_FILES)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    """Temporaries in the names cellmorph's writers use (`.NAME.tmp-*`), the user's own excepted."""
    return [p for p in folder.rglob(".*.tmp-*") if p.name not in USER_FILES]


def metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m["context"].pop("seconds_in_folds_this_invocation", None)
    return m


@pytest.fixture(scope="module")
def world(data_dir, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("faults"), data_dir)


@pytest.fixture(scope="module")
def reference(world) -> Path:
    """An uninterrupted tiny run, beside the user's files: they survive; its metrics are what every
    interrupted and resumed run must reproduce."""
    out = beside_user_files(world.root / "reference-parent" / "reference")
    code, text = cli(world, "run", world.config, "--out", out)
    assert code == 0, text
    assert_user_files(out.parent)
    assert not leftovers(out)
    return out


# --- the runs that work: user files survive, Ctrl-C and resume ----------------------------------------------


def test_good_run_keeps_user_files(reference):
    assert (reference / "metrics.json").is_file() and len(list(reference.glob("folds/*/predictions.parquet"))) == 6
    assert_user_files(reference.parent)
    assert not list(reference.parent.glob(".*.lock"))  # the folder's lock is released and gone


def test_run_into_a_folder_of_user_files_is_refused(world, monkeypatch, capsys):
    """cellmorph never overwrites a user's file: a --out folder holding files it did not write is refused
    before anything is decoded or written, with one of them named."""
    out = with_user_files(world.root / "users-folder")
    (out / "metrics.json").write_text("the user's own metrics\n")
    before = snapshot(out)
    code, text = cli_here(world, monkeypatch, capsys, "run", world.config, "--out", out)
    error_line(code, text, str(out), "holds files cellmorph did not write (e.g. .notes.tmp-1)")
    assert snapshot(out) == before


def test_second_process_on_one_run_folder_is_refused_naming_the_holder(world, monkeypatch, capsys):
    """While one process holds a run folder, a second `cellmorph run` into it gets one line naming the holder
    (pid, since when) and changes nothing."""
    out = world.root / "held"
    with holding(world, out) as pid:
        code, text = cli_here(world, monkeypatch, capsys, "run", world.config, "--out", out)
        error_line(code, text, str(out), "in use by another cellmorph process", f"pid {pid} since")
        assert not out.exists()
    code, text = cli(world, "run", world.config, "--out", out, "--set", "evaluation.max_folds=1")  # the holder died: free again
    assert code == 0, text


# Slow fold 3 down so that SIGINT lands mid-run at a known point (nothing else changes: the real CLI runs).
_SLOW_THIRD_FOLD = """
import os, sys, time
from pathlib import Path
import cellmorph.models.features as features

real, calls = features.logistic_head, []
def slow(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
        Path(os.environ["FAULTS_MARK"]).write_text("in fold 3")
        time.sleep(300)
    return real(*args, **kw)
features.logistic_head = slow
sys.argv = ["cellmorph", *sys.argv[1:]]
from cellmorph.cli import main
main()
"""


def _stop_at_fold_3_then_resume(world: World, reference: Path, name: str, sig: signal.Signals, code: int, line: str) -> None:
    """A run slowed at fold 3 gets `sig` there: exit `code`, `line` as its last and only such line, no traceback,
    folds 00 and 01 whole, nothing of ours half-written; the same command then resumes to the reference's metrics."""
    out = beside_user_files(world.root / f"{name}-parent" / name)
    mark = world.root / f"{name}-fold3.mark"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_THIRD_FOLD, "run", str(world.config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**world.env, "FAULTS_MARK": str(mark)}, cwd=world.root)
    deadline = time.monotonic() + 240
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists(), proc.communicate(timeout=60)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    text = stdout + stderr
    assert proc.returncode == code, text
    assert "Traceback" not in text and "Aborted" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[-1] == line and text.count(line) == 1, text
    done = sorted(p.parent.name for p in out.glob("folds/*/predictions.parquet"))
    assert done == ["00", "01"] and not (out / "metrics.json").exists()
    assert not leftovers(out)
    assert not list(out.parent.glob(".*.lock"))  # the run folder's lock went with the `with` block, not with the process
    assert_user_files(out.parent)

    code, text = cli(world, "run", world.config, "--out", out)
    assert code == 0, text
    assert "resuming" in text and "2 of 6 folds already done" in text, text
    assert metrics(out) == metrics(reference)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), pd.read_parquet(reference / "predictions.parquet"))
    assert_user_files(out.parent)


def test_ctrl_c_says_resume_exits_130_and_resumes_to_the_same_metrics(world, reference):
    _stop_at_fold_3_then_resume(world, reference, "interrupted", signal.SIGINT, 130, INTERRUPTED)  # SIGINT: what Ctrl-C sends


def test_sigterm_says_resume_exits_143_and_resumes_to_the_same_metrics(world, reference):
    """SIGTERM (kill, a batch scheduler's time limit, docker stop) takes the Ctrl-C path: one line, exit 143."""
    assert TERMINATED == "terminated (SIGTERM); rerun the same command to resume"
    _stop_at_fold_3_then_resume(world, reference, "terminated", signal.SIGTERM, 143, TERMINATED)


# --- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB file system (tmpfs; needs root or CAP_SYS_ADMIN): ENOSPC from the kernel, not a mock.
    Room for a whole run with its final model (a 14 MB bundle) once the tests' filler is gone."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no `mount` command: no real way to make a small file system here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a small tmpfs for a real ENOSPC (not root?): {proc.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with a user's big file."""
    filler = disk / "big-user-file.bin"
    st = os.statvfs(disk)
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
    return filler


def test_full_disk_is_one_line_and_the_rerun_resumes(world, reference, small_disk):
    out = beside_user_files(small_disk / "run-parent" / "run")
    filler = _fill(small_disk, 24 * 1024)  # room for the config files and a fold or so, not for a run
    code, text = cli(world, "run", world.config, "--out", out)
    line = error_line(code, text, "no space left on the device writing", str(out), "free space and rerun the same command (it resumes)",
                      only_line=False)
    written = Path(line.split("writing ", 1)[1].split(";", 1)[0].split(" (")[0])
    assert written.parent == out or out in written.parents, line
    assert not leftovers(out)  # the temporary of the failed write is gone
    for fold in out.glob("folds/*"):  # a fold is whole or not there
        if (fold / "predictions.parquet").exists():
            pd.read_parquet(fold / "predictions.parquet")
    assert_user_files(out.parent)
    filler.unlink()  # "free space"
    code, text = cli(world, "run", world.config, "--out", out)  # "and rerun the same command"
    assert code == 0, text
    assert metrics(out) == metrics(reference)
    assert_user_files(out.parent)


def test_full_disk_while_saving_the_final_model_is_one_line(world, small_disk):
    """The folds fit, the final model (a 14 MB bundle) does not: one line naming the bundle, no half bundle."""
    from cellmorph.models.bundle import save_bundle
    from cellmorph.config import load_config
    from cellmorph.errors import CellmorphError

    _fill(small_disk, 2 * 1024 * 1024)
    with pytest.raises(CellmorphError, match="no space left on the device writing .*model"):
        save_bundle(small_disk / "model", {"w": np.zeros(1 << 20)}, {}, load_config(world.config))
    assert [p.name for p in small_disk.iterdir() if p.name.startswith(".model")] == []


def test_full_disk_during_prepare_keeps_the_old_store(world, mini_bbbc013, small_disk):
    out = with_user_files(small_disk / "store")
    code, text = cli(world, "prepare", "bbbc013", "--out", out, "--data", mini_bbbc013, "--workers", "1")
    assert code == 0, text
    before = snapshot(out)
    _fill(small_disk, 64 * 1024)
    code, text = cli(world, "prepare", "bbbc013", "--out", out, "--data", mini_bbbc013, "--workers", "1")
    error_line(code, text, f"no space left on the device writing {out / 'images.npy'}", "free space and rerun", only_line=False)
    assert snapshot(out) == before  # the old store, untouched
    assert [p.name for p in small_disk.iterdir() if p.name.startswith(".")] == []  # no staging folder left


# --- a killed, a failed and a good `prepare` ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_bbbc013(world) -> Path:
    """Three wells of the real BBBC013 plate (their 8-bit zlib TIFFs), as a data folder."""
    src = world.shared / "bbbc013"
    if not (src / "1049_Metadata.csv").is_file():
        pytest.skip(f"{src} not found")
    dst = world.root / "bbbc013-mini" / "bbbc013"
    dst.mkdir(parents=True)
    meta = pd.read_csv(src / "1049_Metadata.csv", dtype={"Column": str, "Row": str})
    meta = pd.concat([meta[meta["SBS_Doses"] == 0].head(2), meta[meta["SBS_Doses"] == 10].head(1)]).sort_values("ImageNumber")  # both classes
    meta.to_csv(dst / "1049_Metadata.csv", index=False)
    names = []
    for n, r, c in zip(meta["ImageNumber"], meta["Row"], meta["Column"]):
        for ch in (1, 2):
            names.append(f"Channel{ch}-{int(n):02d}-{r}-{int(c):02d}.tif")
            shutil.copyfile(src / names[-1], dst / names[-1])
    world.second_well_gfp = dst / names[2]  # read after the store is begun
    return dst.parent


# Die by SIGKILL halfway through writing the store: no cleanup code runs.
_KILLED_PREPARE = """
import os, signal, sys
import cellmorph.data.prepare as prepare

real, n = prepare.StoreWriter.add, []
def add_then_die(self, image, row):
    real(self, image, row)
    n.append(1)
    if len(n) == 20:
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
prepare.StoreWriter.add = add_then_die
sys.argv = ["cellmorph", *sys.argv[1:]]
from cellmorph.cli import main
main()
"""


def test_prepare_killed_then_failed_keeps_the_store_and_cleans_only_its_own(world, mini_bbbc013):
    out = with_user_files(world.root / "prepared" / "store")
    (out / ".images.npy.tmp-old123").write_bytes(b"x" * 1000)  # what a killed prepare of earlier versions left in the store
    neighbours = {".store.backup": "a user's folder beside the store", "store.notes.txt": "mine"}
    for name, body in neighbours.items():
        (out.parent / name).write_text(body)

    proc = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, "prepare", "bbbc013", "--out", str(out), "--data", str(mini_bbbc013), "--workers", "1"],
                          capture_output=True, text=True, env=world.env, cwd=world.root, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (staging,) = out.parent.glob(".store.tmp-*")
    assert (staging / "images.npy").stat().st_size > 20 * 3 * 160 * 160  # the killed build's crops, beside the store
    assert sorted(p.name for p in out.iterdir()) == sorted(USER_FILES)  # the old leftover went first; nothing new in the folder

    code, text = cli(world, "prepare", "bbbc013", "--out", out, "--data", mini_bbbc013, "--workers", "1")
    assert code == 0, text
    assert "48 images of 3x160x160" in text, text
    assert not staging.exists()  # the killed prepare's ~1.4 MB: removed
    assert sorted(p.name for p in out.iterdir()) == sorted([*USER_FILES, "images.npy", "index.parquet", "prepared.json"])
    for name, body in neighbours.items():
        assert (out.parent / name).read_text() == body
    good = snapshot(out)

    # The same prepare with one input file corrupt (an interrupted copy): the error names it, the good store stays.
    bad = world.second_well_gfp
    original = bad.read_bytes()
    bad.write_bytes(original[: len(original) // 2])
    try:
        code, text = cli(world, "prepare", "bbbc013", "--out", out, "--data", mini_bbbc013, "--workers", "1")
    finally:
        bad.write_bytes(original)
    error_line(code, text, str(bad), "corrupt or truncated", only_line=False)
    assert snapshot(out) == good
    assert not list(out.parent.glob(".store.tmp-*"))
    for name, body in neighbours.items():
        assert (out.parent / name).read_text() == body


def test_prepare_out_is_a_file(world, mini_bbbc013):
    blocker = world.root / "a-store-file"
    blocker.write_text("not a folder")
    code, text = cli(world, "prepare", "bbbc013", "--out", blocker, "--data", mini_bbbc013)
    error_line(code, text, str(blocker), "--out", only_line=False)
    assert blocker.read_text() == "not a folder"


# --- the data and the config: every value a user gives in the CSV, the file or with --set -----------------------
#
# Each case is its own `cellmorph run` process; they start together (two at a time: most of a case is
# importing torch) and each test checks its own.


def _bbbc013_folder(world: World, name: str) -> Path:
    """A folder-dataset CSV of four real BBBC013 GFP fields (8-bit zlib TIFFs)."""
    folder = world.root / name
    folder.mkdir()
    src = world.shared / "bbbc013"
    if not (src / "Channel1-01-A-01.tif").is_file():
        pytest.skip(f"{src} not found")
    rows = []
    for i in range(1, 5):
        f = f"Channel1-{i:02d}-A-{i:02d}.tif"
        shutil.copyfile(src / f, folder / f)
        rows.append({"Image_Path_GFP": f, "Metadata_MoA": "AB"[i % 2], "Metadata_Compound": f"c{i}"})
    pd.DataFrame(rows).to_csv(folder / "screen.csv", index=False)
    return folder


def _truncated_tiff(w: World):
    folder = _bbbc013_folder(w, "tiff-truncated")
    bad = folder / "Channel1-03-A-03.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # an interrupted copy
    return [w.write_config("tiff-truncated.toml", str(folder / "screen.csv"))], (str(bad), "corrupt or truncated; re-export or re-download it")


def _nan_tiff(w: World):
    folder = _bbbc013_folder(w, "tiff-nan")
    f = folder / "Channel1-02-A-02.tif"
    pixels = tifffile.imread(f).astype(np.float32) / 255  # a float export, e.g. after flat-field correction
    pixels[10:20, 10:15] = np.nan
    tifffile.imwrite(f, pixels)
    return [w.write_config("tiff-nan.toml", str(folder / "screen.csv"))], (str(f), "50 of 409600 pixels are NaN or infinite", "Re-export")


def _image_missing(w: World):
    df = w.rows.copy()
    df.loc[5, "Image_Path_RGB"] = str(w.root / "no-such-image.png")
    return [w.write_config("missing-image.toml", w.csv("missing-image.csv", df))], ("missing-image.csv", "no-such-image.png", "does not exist", "Check the data folder")


def _label_missing(w: World):
    return [w.write_config("no-label.toml", w.csv("no-label.csv", w.rows.drop(columns=["Metadata_MoA"])))], ("no-label.csv", "Metadata_MoA")


def _csv_missing(w: World):
    return [w.write_config("no-csv.toml", "nope.csv")], (str(w.data / "nope.csv"), "dataset.options.csv")


def _single_compound(w: World):
    df = w.rows.assign(Metadata_Compound="DMSO")
    return [w.write_config("one-compound.toml", w.csv("one-compound.csv", df))], ("Metadata_Compound",)


def _one_compound_per_class(w: World):
    df = w.rows[w.rows["Metadata_Compound"].isin(["AZ841", "AZ-C", "anisomycin"])]
    return [w.write_config("one-per-class.toml", w.csv("one-per-class.csv", df))], (
        "evaluation.protocol = 'loco'", "no training data", "3 excluded", "choose another protocol")


def _typo_in_file(w: World):
    config = w.write_config("typo.toml", "images.csv", "\n[frozen]\nCc = 2\n")
    return [config], (str(config), "frozen.Cc", "unknown field", "Fix the file")


def _typo_under_set(w: World):
    return [w.config, "--set", "evaluaton.protocol=logo"], ("--set evaluaton.protocol=logo", "evaluaton", "Fix the override")


def _wrong_type(w: World):
    config = w.root / "wrong-type.toml"
    config.write_text('seed = "zero"\n' + w.config.read_text())
    return [config], (str(config), "seed", "integer")


def _wrong_type_under_set(w: World):
    return [w.config, "--set", "frozen.C=strong"], ("--set frozen.C=strong", "frozen.C", "number")


def _out_of_range_under_set(w: World):
    return [w.config, "--set", "dataset.image_size=-32"], ("--set dataset.image_size=-32", "dataset.image_size", "greater than or equal to 0")


def _unknown_protocol_under_set(w: World):
    return [w.config, "--set", "evaluation.protocol=leave-one-out"], ("evaluation.protocol", "'loco'", "leave-one-out")


def _unknown_model(w: World):
    return [w.config, "--set", "model.name=resnet5O"], ("resnet5O", "model.name")


def _missing_data_folder(w: World):
    return [w.config, "--data", w.root / "nope"], (str(w.root / "nope"), "does not exist", "CELLMORPH_DATA")


def _unknown_group_column(w: World):
    return [w.config, "--set", "evaluation.protocol=logo", "--set", "evaluation.group=Metadata_Nope"], ("Metadata_Nope",)


def _cache_not_writable(w: World):
    blocker = w.root / "cache-file"
    blocker.write_text("not a folder")
    return [w.config], ("cache folder", "CELLMORPH_CACHE"), {"CELLMORPH_CACHE": str(blocker / "cache")}


# name: (how to make it, whether only the error line may be printed: not so once images are decoded)
CASES = {
    "truncated-zlib-tiff": (_truncated_tiff, False),
    "nan-float-tiff": (_nan_tiff, False),
    "image-file-missing": (_image_missing, True),
    "label-column-missing": (_label_missing, True),
    "csv-missing": (_csv_missing, True),
    "loco-single-compound": (_single_compound, True),
    "loco-one-compound-per-class": (_one_compound_per_class, True),
    "config-typo-in-file": (_typo_in_file, True),
    "typo-under-set": (_typo_under_set, True),
    "wrong-type-in-file": (_wrong_type, True),
    "wrong-type-under-set": (_wrong_type_under_set, True),
    "out-of-range-under-set": (_out_of_range_under_set, True),
    "unknown-protocol-under-set": (_unknown_protocol_under_set, True),
    "unknown-model": (_unknown_model, True),
    "missing-data-folder": (_missing_data_folder, True),
    "unknown-group-column": (_unknown_group_column, True),
    "cache-not-writable": (_cache_not_writable, False),
}


@pytest.fixture(scope="module")
def failed_runs(world) -> dict:
    """Every case's (exit code, output, --out folder, needles, only_line), run two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {}
    for name, (make, only_line) in CASES.items():
        args, needles, *env = make(world)
        out = beside_user_files(world.root / "failed" / name / "out")
        jobs[name] = (["run", *args, "--out", out], env[0] if env else None, out, needles, only_line)
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(lambda j: cli(world, *j[0], env=j[1]), jobs.values())))
    return {name: (*done[name], job[2], job[3], job[4]) for name, job in jobs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(failed_runs, case):
    """Exit 2, one line naming the file/field and the fix, and no --out folder (beside the user's files):
    validation and decoding come before any result is written."""
    code, text, out, needles, only_line = failed_runs[case]
    print(error_line(code, text, *needles, only_line=only_line))
    assert cellmorph_files(out) == [], cellmorph_files(out)
    assert_user_files(out.parent)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(USER_FILES)  # no folder, no lock left


def test_failed_start_leaves_no_folder(world):
    """An unknown group column fails the plan; a --out folder that did not exist is not created."""
    out = world.root / "failed" / "never-created"
    code, text = cli(world, "run", world.config, "--out", out, "--set", "evaluation.protocol=logo", "--set", "evaluation.group=Metadata_Nope")
    print(error_line(code, text, "Metadata_Nope"))
    assert not out.exists()


@pytest.mark.parametrize("case", ["pickle_weights", "seed_out_of_range"])
def test_what_can_be_checked_fails_before_the_folder_is_claimed(world, case, monkeypatch, capsys):
    """A weights file that cannot be read (a pickle payload: refused by weights_only, never run) and a seed out of
    numpy's range are found while planning: one line, and --out is neither created nor written."""
    out = world.root / "failed-early" / case
    if case == "pickle_weights":
        bad = world.root / "evil.pth"
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, ("touch " + str(world.root / "pwned"),))

        bad.write_bytes(pickle.dumps({"conv_stem.weight": Payload()}))
        args, needles = ["--set", f"model.init={bad}"], [str(bad), "cannot read weights"]
    else:
        args, needles = ["--set", "seed=5000000000"], ["seed", "less than or equal"]
    code, text = cli_here(world, monkeypatch, capsys, "run", world.config, "--out", out, *args)
    print(error_line(code, text, *needles, only_line=False))
    assert not out.exists() and not out.parent.exists() or not any(out.parent.iterdir())
    assert not (world.root / "pwned").exists()


@pytest.mark.parametrize("verb", ["summarize", "embed", "predict"])
def test_other_verbs_refuse_a_users_folder_and_clean_their_own_leftovers(world, reference, verb, monkeypatch, capsys):
    """summarize, embed and predict --out: a folder holding a user's file is refused (one line, the file named,
    nothing changed); in a folder of their own, what a killed earlier command left (a temporary file inside,
    a temporary folder beside, safetensors' bytes included) is removed by the next command, and only that."""
    args = {"summarize": ["summarize", reference], "embed": ["embed", reference],
            "predict": ["predict", reference / "model", world.data / "images.csv"]}[verb]
    users = with_user_files(world.root / f"{verb}-users")
    (users / "mine.parquet").write_text("the user's")
    before = snapshot(users)
    code, text = cli_here(world, monkeypatch, capsys, *args, "--out", users)
    error_line(code, text, str(users), "holds files cellmorph did not write")
    assert snapshot(users) == before
    out = world.root / f"{verb}-out" / "out"
    own = {"summarize": out / ".summary.csv.tmp-dead1", "embed": out / ".embeddings.parquet.tmp-dead1", "predict": None}[verb]
    beside = out.parent / ".out.tmp-dead2"  # predict builds its folder beside --out and renames it
    beside.mkdir(parents=True)
    (beside / "predictions.parquet").write_text("a killed write's")
    if verb != "predict":
        beside.rename(out.parent / "not-ours-to-judge")  # summarize and embed stage no folder: a neighbour is not theirs
        beside = out.parent / "not-ours-to-judge"
    if own is not None:
        out.mkdir()
        own.write_text("a killed write's")
    code, text = cli_here(world, monkeypatch, capsys, *args, "--out", out)
    assert code == 0, text
    assert (not beside.exists()) == (verb == "predict") and (own is None or not own.exists())
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out"] + ([] if verb == "predict" else ["not-ours-to-judge"]))  # no lock left


def test_second_predict_into_one_folder_is_refused_naming_the_first(world, reference, monkeypatch, capsys):
    out = world.root / "predict-held"
    with holding(world, out) as pid:
        code, text = cli_here(world, monkeypatch, capsys, "predict", reference / "model", world.data / "images.csv", "--out", out)
        error_line(code, text, str(out), "in use by another cellmorph process", f"pid {pid} since")
        assert not out.exists()


def test_rerun_after_the_data_changed_is_refused_not_mixed(world, reference):
    changed = world.root / "data-changed"
    changed.mkdir()
    world.rows.iloc[4:].to_csv(changed / "images.csv", index=False)  # 4 rows removed
    before = snapshot(reference)
    code, text = cli(world, "run", world.config, "--out", reference, "--data", changed)
    print(error_line(code, text, str(reference), "the dataset changed", "24 rows then, 20 now", "Choose another --out", only_line=False))
    assert snapshot(reference) == before
    assert_user_files(reference.parent)


def test_output_folder_under_a_file(world):
    blocker = world.root / "a-file"
    blocker.write_text("not a folder")
    code, text = cli(world, "run", world.config, "--out", blocker / "run")
    print(error_line(code, text, str(blocker), "--out", only_line=False))
    assert blocker.read_text() == "not a folder"
