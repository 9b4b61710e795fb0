"""Issue 24 ("a scientist's first hour with their own data"), on real 27x27 H&E nucleus patches with a patient column:
every column the config names is checked before any work (item 3)."""

from __future__ import annotations

import pandas as pd
import pytest


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
