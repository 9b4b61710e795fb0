"""A run folder, and where fold results live: on disk (`FolderSink`) or in memory (`MemorySink`).

Layout (the file names are storage.RUN's):

    config.toml           the resolved config (every default written out)
    dataset.json          the fingerprint of the data the folds were computed from
    environment.json      versions, device, seeds, git commit, start time
    folds/NN/             per fold: fold.json (held-out group, sizes), history.json (fine-tuning),
                          curve_probs.npy (test probabilities at each curve point, when asked),
                          model.pt (finetune.save_models), predictions.parquet (its presence marks the fold done)
    seeds/S/...           with several seeds: the same per seed (storage.seed_folder)
    predictions.parquet, metrics.json, treatments.csv, wells.csv, plots, report.html, model/ (the final model)

The folder is claimed through cellmorph.storage (refused when it holds a user's files; locked against a
second process; our own leftovers removed); a fold folder is written whole (a temporary folder renamed).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.config import ExperimentConfig, dump_toml
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.splits import Fold
from cellmorph.io import atomic_path, write_json, write_npy, write_parquet, write_text
from cellmorph.storage import RUN, fold_folder, make_temporary_folder, remove_own_folder


# Settings that do not change any fold's results: where the folds run ([execution]: a run started on Ray resumes
# locally, and back), whether the final model is saved (save_model: a finished run adds its model later, fitted
# once more and calibrated on the folds it has) and which extra outputs are written from the predictions (outputs).
NOT_COMPUTED = ("execution", "save_model", "outputs")


def what_is_computed(config_toml: str) -> dict:
    """A resolved config without the settings that do not change the folds' numbers (NOT_COMPUTED): a rerun that
    differs only there resumes the run folder instead of being refused as another config. The config is read
    through this cellmorph's ExperimentConfig first, so a setting added since the run was made (absent from its
    config.toml) counts as its default, not as a difference."""
    data = tomllib.loads(config_toml)
    try:
        data = ExperimentConfig.model_validate(data).model_dump(mode="json")
    except ValueError:  # not a config this cellmorph reads (pydantic's ValidationError is a ValueError): compared as written
        pass
    for key in NOT_COMPUTED:
        data.pop(key, None)
    return data


def claim_run_folder(out: Path, cfg: ExperimentConfig, store_key: str, rows: int) -> None:
    """Make `out`, already claimed (storage.claim(out, RUN), holding storage.locked(out)), this run's folder:
    refused when it holds a run of another config, or one computed from other data (a changed dataset must
    not mix old folds with new ones). Then config.toml and dataset.json are written."""
    resolved = dump_toml(cfg) + "\n"
    cfg_path, data_path = out / "config.toml", out / "dataset.json"
    if cfg_path.is_file():
        if what_is_computed(cfg_path.read_text()) != what_is_computed(resolved):
            raise CellmorphError(
                f"{out} holds a run of a different config ({cfg_path} differs{_first_difference(cfg_path.read_text(), resolved)}). "
                "Resume it with the same config, or choose another --out."
            )
        if data_path.is_file():
            old = json.loads(data_path.read_text())
            if old.get("store_key") != store_key:
                raise CellmorphError(
                    f"{out} holds results computed from other data: the dataset changed since that run "
                    f"({old.get('rows')} rows then, {rows} now; fingerprint {old.get('store_key')} vs {store_key}). "
                    "Choose another --out for the new data (or delete the old run folder to start over)."
                )
    write_text(cfg_path, resolved)
    write_json(data_path, {"store_key": store_key, "rows": int(rows), "dataset": cfg.dataset.name})


def _first_difference(old_toml: str, new_toml: str) -> str:
    """': field X was A, now B' for the first setting (as a dotted name) that differs between two resolved configs."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "options" else {f"{prefix}{k}": v})
        return out

    old, new = flat(what_is_computed(old_toml)), flat(what_is_computed(new_toml))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f": {key} was {old.get(key)!r}, now {new.get(key)!r}"
    return ""


class FoldResult:
    """One fold's test probabilities (n_test x n_classes), fine-tuning history, and the probabilities at
    the curve points (points x n_test x n_classes) with their epochs or iterations."""

    def __init__(self, probs: np.ndarray, history: dict | None = None, curve_x: list[int] | None = None, curve_unit: str = "epoch",
                 curve_probs: np.ndarray | None = None):
        self.probs, self.history, self.curve_x, self.curve_unit, self.curve_probs = probs, history, list(curve_x or []), curve_unit, curve_probs


class FolderSink:
    """Fold results of one seed in its run folder (folds/NN/)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where = str(folder)

    def fold_dir(self, i: int) -> Path:
        return fold_folder(self.folder, i)

    def done(self, i: int) -> bool:
        return (self.fold_dir(i) / "predictions.parquet").is_file()

    def save(self, i: int, fold: Fold, pred: pd.DataFrame, res: FoldResult, model) -> None:
        """Write the fold folder whole or not at all: its files go to a temporary folder `folds/.NN.tmp-*`,
        renamed to folds/NN once complete (a Ray task or a killed run never leaves half a fold)."""
        final = self.fold_dir(i)
        d = make_temporary_folder(final)
        try:
            info = {"index": i, "held_out": fold.name, "n_train": len(fold.train), "n_test": len(fold.test)}
            if res.curve_probs is not None:
                info.update({"curve_unit": res.curve_unit, "curve_x": res.curve_x})
                write_npy(d / "curve_probs.npy", res.curve_probs)
            write_json(d / "fold.json", info)
            if res.history is not None:
                write_json(d / "history.json", res.history)
            if model is not None:
                import torch

                with atomic_path(d / "model.pt") as tmp:
                    torch.save(model.state_dict(), tmp)
            write_parquet(d / "predictions.parquet", pred)  # its presence marks the fold done
            move_fold_dir(d, final)
        except CellmorphError as err:  # e.g. a full disk: name the fold's file, not its temporary folder
            raise CellmorphError(str(err).replace(str(d), str(final))) from None
        finally:
            remove_own_folder(d, RUN.names)

    def predictions(self, i: int) -> pd.DataFrame:
        return pd.read_parquet(self.fold_dir(i) / "predictions.parquet")

    def history(self, i: int) -> dict | None:
        f = self.fold_dir(i) / "history.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def curve(self, i: int):
        info = json.loads((self.fold_dir(i) / "fold.json").read_text())
        if "curve_x" not in info:
            return None
        return info["curve_unit"], info["curve_x"], np.load(self.fold_dir(i) / "curve_probs.npy")


class MemorySink:
    """Fold results kept in memory (cross_validate: nothing written)."""

    where = "memory"

    def __init__(self):
        self.results: dict[int, tuple[pd.DataFrame, FoldResult]] = {}

    def done(self, i: int) -> bool:
        return i in self.results

    def save(self, i: int, fold: Fold, pred: pd.DataFrame, res: FoldResult, model) -> None:
        self.results[i] = (pred, res)

    def predictions(self, i: int) -> pd.DataFrame:
        return self.results[i][0]

    def history(self, i: int) -> dict | None:
        return self.results[i][1].history

    def curve(self, i: int):
        res = self.results[i][1]
        return None if res.curve_probs is None else (res.curve_unit, res.curve_x, res.curve_probs)


def move_fold_dir(d: Path, final: Path) -> None:
    """Rename the complete temporary fold folder onto folds/NN. A folds/NN without predictions.parquet (left by
    an older cellmorph that wrote fold files in place) holds only cellmorph's files: it is replaced.

    Another attempt of the same fold (a Ray retry, or a worker of a killed driver still finishing while the
    rerun computes that fold) may finish first: its complete folder is kept, also when it lands between the
    check and the rename here."""
    if (final / "predictions.parquet").is_file():  # another attempt of this fold finished first: keep it
        return
    if final.is_dir() and not remove_own_folder(final, RUN.names):
        raise CellmorphError(f"{final} holds files cellmorph did not write; move them away and rerun the same command.")
    try:
        os.rename(d, final)
    except OSError:
        if (final / "predictions.parquet").is_file():  # renamed by the other attempt just now: keep that one
            return
        raise
