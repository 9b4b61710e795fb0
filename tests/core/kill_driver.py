"""The driver of tests/core/test_storage.py::test_sigkill_at_every_rename_leaves_nothing_after_the_next_command,
run as a script in a small Python process of its own: each kill point is a fork of this process, and forking
the test session's large process some 80 times would cost more than the work itself.

    python tests/core/kill_driver.py DATA_DIR WORK_DIR      (CELLMORPH_CACHE set by the caller)

It asserts every step and prints "run kill points: N" and "predict kill points: M"."""

import os
import signal
import sys
from pathlib import Path

import pandas as pd

from cellmorph.config import load_config
from cellmorph.engine.runner import run_experiment
from cellmorph.prediction.predict import predict_images


def _counted(real, seen: list, kill_at: int):
    def f(*a, **k):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return f


def killed_at(n: int, work) -> int:
    """`work()` in a forked child that SIGKILLs itself at its n-th rename (os.replace / os.rename: every commit
    point of cellmorph's writers; n = 0: never). Returns -SIGKILL when killed, 0 when `work` finished, 3 when it raised."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup (os._exit), nothing shared with the parent but the files
        try:
            seen = [0]
            os.replace, os.rename = _counted(os.replace, seen, n), _counted(os.rename, seen, n)
            work()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - reported by the exit status
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def ours_left(folder: Path) -> list[str]:
    """Temporaries of cellmorph's writers (and any safetensors temporary) and lock files, in and beside `folder`."""
    return [str(p.relative_to(folder.parent)) for p in [*folder.parent.iterdir(), *(folder.rglob("*") if folder.is_dir() else [])]
            if ".tmp-" in p.name or ".old-" in p.name or p.name.startswith("tmp") or p.name.endswith(".lock")]


def main(data_dir: Path, tmp: Path) -> None:
    labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = []
    for c in ("AZ841", "AZ258", "AZ-C", "AZ138"):
        for i, r in labels[labels["compound"] == c].head(3).iterrows():
            rows.append({"Image_Path_RGB": str(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png"), "Metadata_MoA": r["moa"],
                         "Metadata_Compound": c, "Metadata_Concentration": r["concentration"], "Metadata_Plate": r["plate"],
                         "Metadata_Well": r["well"]})
    pd.DataFrame(rows).to_csv(tmp / "images.csv", index=False)
    (tmp / "tiny.toml").write_text('name = "tiny"\nmode = "frozen"\ndevice = "cpu"\nsave_model = true\n[dataset]\nname = "folder"\nimage_size = 32\n'
                                   f'options = {{csv = "{tmp / "images.csv"}"}}\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n'
                                   '[evaluation]\nmax_folds = 2\n')  # two folds: every kind of commit point, half the repeats
    cfg = load_config(tmp / "tiny.toml")
    ref = tmp / "ref"
    run_experiment(cfg, ref / "run", tmp)  # fills the feature cache: the run's children never use torch
    want = (ref / "run" / "treatments.csv").read_text()
    n = 1
    while (code := killed_at(n, lambda: run_experiment(cfg, tmp / f"run-{n}" / "run", tmp))) != 0:
        out = tmp / f"run-{n}" / "run"
        assert code == -signal.SIGKILL, (n, code)
        assert killed_at(0, lambda: run_experiment(cfg, out, tmp)) == 0, n  # the next command completes the work ...
        assert ours_left(out) == [], (n, ours_left(out))  # ... and leaves nothing of ours behind
        assert (out / "treatments.csv").read_text() == want, n
        n += 1
    print(f"run kill points: {n - 1}")

    def predict(out: Path) -> None:
        import torch

        torch.set_num_threads(1)  # a forked child: no OpenMP pool of the parent is used
        predict_images(ref / "run" / "model", tmp / "images.csv", out, overwrite=True)

    n, rerun = 1, []
    while (code := killed_at(n, lambda: predict(tmp / f"pred-{n}"))) != 0:
        out = tmp / f"pred-{n}"
        assert code == -signal.SIGKILL, (n, code)
        assert killed_at(0, lambda: predict(out)) == 0, n
        assert ours_left(out) == [], (n, ours_left(out))
        rerun.append(out)
        n += 1
    want_pred = pd.read_parquet(tmp / f"pred-{n}" / "predictions.parquet")  # the call that ran to the end, never killed
    for out in rerun:
        pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), want_pred)
    print(f"predict kill points: {n - 1}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
