"""Issue 24 ("a scientist's first hour with their own data"), on real 27x27 H&E nucleus patches with a patient column:
every column the config names is checked before any work (item 3), and a finished run adds its calibrated final
model without a second cross-validation (item 4)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

import cellmorph as cm
from cellmorph.config import load_config


@pytest.mark.parametrize("column, field", [("Metadata_Label", "dataset.label"), ("Metadata_Patient", "evaluation.group")])
def test_a_named_column_without_the_metadata_prefix_fails_before_any_image_is_decoded(nuclei_patches, nuclei_config, tmp_path, monkeypatch,
                                                                                     capsys, cli, no_image_decoded, column, field):
    bare = column.removeprefix("Metadata_").lower()  # "label" / "patient", as a lab's own table names them
    df = pd.read_csv(nuclei_patches / "cells.csv").rename(columns={column: bare})
    df["Image_Path_HE"] = [str(nuclei_patches / p) for p in df.Image_Path_HE]
    df.to_csv(tmp_path / "cells.csv", index=False)
    (tmp_path / "cfg.toml").write_text(nuclei_config(tmp_path).replace(f'"{column}"', f'"{bare}"'))
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in said, said
    assert f"{field} = '{bare}'" in said and str(tmp_path / "cells.csv") in said  # the field, the column, the file
    assert f"Rename the column '{bare}'" in said and f"'Metadata_{bare}'" in said and f'set {field} = "Metadata_{bare}"' in said
    assert not (tmp_path / "run").exists()


def test_an_absolute_csv_needs_no_data_folder(nuclei_patches, nuclei_config, tmp_path, monkeypatch, capsys, cli):
    """No --data and no CELLMORPH_DATA: the CSV's absolute path says where everything is. The fold progress names the
    patient column (item 7)."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    monkeypatch.setenv("CELLMORPH_PROGRESS_SECONDS", "0")
    (tmp_path / "cfg.toml").write_text(nuclei_config(nuclei_patches))
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "--set", "save_model=false")
    assert code == 0, said
    assert "image accuracy" in said and "6 folds" in said
    assert "fold 1/6: Metadata_Patient=10" in said and "fold 6/6: Metadata_Patient=9" in said  # the held-out patient, named
    assert "split: leave-one-group-out over Metadata_Patient: 6 folds over 72 rows" in said
    # a relative csv still needs the data folder, and says so
    (tmp_path / "rel.toml").write_text(nuclei_config(nuclei_patches).replace(str(nuclei_patches / "cells.csv"), "cells.csv"))
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "rel.toml", "--out", tmp_path / "rel")
    assert code == 2 and "--data DIR" in said and "CELLMORPH_DATA" in said


# A fine-tune small enough for seconds: the course's LeNet from scratch, one epoch on the 72 patches.
TINY_LENET = ["mode=finetune", "model.name=lenet", "model.init=xavier", "finetune.epochs=1", "finetune.batch_size=16", "finetune.amp=false"]


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_a_finished_run_adds_its_calibrated_model_without_refitting_the_folds(nuclei_patches, nuclei_config, tmp_path, monkeypatch, capsys, mode):
    """save_model, [execution] and outputs do not change a fold's results: a finished run with save_model = false,
    rerun with save_model = true (and another thread count), keeps its folds and only fits the final model, calibrated
    on those folds' out-of-fold predictions. A setting that changes the folds (the seed) is still another config."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    (tmp_path / "cfg.toml").write_text(nuclei_config(nuclei_patches))
    recipe = TINY_LENET if mode == "finetune" else []
    cfg = load_config(tmp_path / "cfg.toml", [*recipe, "save_model=false"])
    out = tmp_path / "run"
    first = cm.run(cfg, out)
    assert not (out / "model").exists()
    folds = sorted((out / "folds").glob("[0-9][0-9]/predictions.parquet"))
    stamps = {p: os.stat(p).st_mtime_ns for p in folds}
    capsys.readouterr()

    again = cm.run(load_config(tmp_path / "cfg.toml", [*recipe, "save_model=true", "execution.threads=1"]), out)
    said = " ".join(capsys.readouterr().err.split())
    assert "6 of 6 folds already done" in said and "final model:" in said
    assert {p: os.stat(p).st_mtime_ns for p in folds} == stamps  # no fold computed again
    assert again.levels == first.levels
    oof = pd.read_parquet(out / "predictions.parquet")
    meta = json.loads((out / "model" / "bundle.json").read_text())
    assert meta["calibration"]["rows"] == len(oof) == 72 and meta["calibration"]["folds"] == 6
    assert meta["trained_on"]["images"] == 72 and meta["mode"] == mode
    model = cm.Classifier.load(out / "model")
    pd.testing.assert_frame_equal(model.calibration, oof[model.calibration.columns].reset_index(drop=True), check_dtype=False)
    assert "save_model = true" in (out / "config.toml").read_text()

    with pytest.raises(cm.CellmorphError, match="different config .*seed was 0, now 1"):
        cm.run(load_config(tmp_path / "cfg.toml", [*recipe, "seed=1"]), out)


def test_a_run_folder_made_before_a_setting_existed_resumes(nuclei_patches, nuclei_config, tmp_path, monkeypatch, capsys):
    """A run folder's config.toml written by an older cellmorph lacks the settings added since: they count as their
    defaults (the folder resumes), while giving the new setting another value is still another config."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    (tmp_path / "cfg.toml").write_text(nuclei_config(nuclei_patches))
    cfg = load_config(tmp_path / "cfg.toml", ["save_model=false"])
    out = tmp_path / "run"
    cm.run(cfg, out)
    written = (out / "config.toml").read_text()
    assert 'features = "last"' in written
    (out / "config.toml").write_text(written.replace('features = "last"\n', ""))  # as a cellmorph without frozen.features wrote it
    capsys.readouterr()
    cm.run(cfg, out)
    assert "6 of 6 folds already done" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(cm.CellmorphError, match="different config .*frozen.features was 'last', now 'stages'"):
        cm.run(load_config(tmp_path / "cfg.toml", ["save_model=false", "frozen.features=stages"]), out)
