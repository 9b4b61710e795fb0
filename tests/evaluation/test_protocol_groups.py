"""Issue 24, item 1: a split is described by the folds actually made, and a group that a protocol would ignore
is refused before any work (a random split with evaluation.group set was reported as holding whole patients out
while every test patient was also in training)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import cellmorph as cm
from cellmorph.config import EvaluationConfig
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.protocols import check_group, describe, make_folds
from cellmorph.evaluation.splits import random_split


def test_random_split_with_a_group_fails_before_any_image_is_decoded(nuclei_patches, nuclei_config, tmp_path, monkeypatch, capsys,
                                                                    cli, no_image_decoded):
    """The user's command on their own patches: --set evaluation.protocol=random with a group column in the config."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    (tmp_path / "cfg.toml").write_text(nuclei_config(nuclei_patches))
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "--set", "evaluation.protocol=random")
    assert code == 2 and "Traceback" not in said, said
    assert "evaluation.group = 'Metadata_Patient'" in said and "'random' draws rows at random and ignores it" in said
    assert "--set evaluation.protocol=logo" in said and 'evaluation.group=""' in said  # the fixes
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("protocol", ["random", "holdout-25", "lcbo"])
def test_every_protocol_that_ignores_the_group_refuses_it(protocol):
    with pytest.raises(CellmorphError, match=f"evaluation.group = 'Metadata_Patient' is set, but evaluation.protocol = '{protocol}'"):
        check_group(EvaluationConfig(protocol=protocol, group="Metadata_Patient"))
    check_group(EvaluationConfig(protocol=protocol))  # its own grouping: fine
    check_group(EvaluationConfig(protocol="lcbo", group="Metadata_Compound"))  # lcbo's own column named: fine
    for grouped in ("logo", "group-kfold", "image-grouped", "loco", "predefined"):
        check_group(EvaluationConfig(protocol=grouped, group="Metadata_Patient"))


def test_the_description_counts_the_groups_of_the_folds_made(nuclei_patches, tmp_path, monkeypatch):
    """Through the API, on the real patches: image-grouped over patients says how many patients are in test and that
    none is in training; the predictions agree. A random split described with that group counts the shared ones."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    table = cm.load_dataset("folder", csv=str(nuclei_patches / "cells.csv"), label="Metadata_Label")
    clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"model.input_size": 32, "device": "cpu"})
    res = cm.cross_validate(clf, table, "image-grouped", overrides={"evaluation.group": "Metadata_Patient", "save_model": False})
    n_test = res.predictions.Metadata_Patient.nunique()
    text = res.metrics.protocol_description
    assert f"whole Metadata_Patient groups held out ({n_test} in test, none of them in training)" in text, text

    df = table.df
    ev = EvaluationConfig(protocol="random")
    (fold,) = random_split(df, 1 / 6, 0)
    shared = len(set(df.Metadata_Patient.iloc[fold.test]) & set(df.Metadata_Patient.iloc[fold.train]))
    held = df.Metadata_Patient.iloc[fold.test].nunique()
    assert shared > 0  # 6 patients, 12 random test rows: the leak the old description hid
    said = describe(df, [fold], [], "Metadata_Patient", ev)
    assert f"rows drawn without regard to Metadata_Patient: {shared} of the {held} Metadata_Patient groups in test are also in training" in said
    assert "held out" not in said
    folds, _, text = make_folds(df, "Metadata_Label", ev)  # no group: random rows, said so
    assert "rows drawn at random" in text


def test_a_leaking_fold_is_named_in_the_description():
    df = pd.DataFrame({"Metadata_Patient": list("aabbcc"), "Metadata_Label": list("xyxyxy")})
    ev = EvaluationConfig(protocol="logo", group="Metadata_Patient")
    folds, _, text = make_folds(df, "Metadata_Label", ev)
    assert text == "leave-one-group-out over Metadata_Patient: 3 folds over 6 rows"
    leaky = [replace(folds[0], train=np.append(folds[0].train, 0))] + folds[1:]  # row 0 (patient a) also trains fold a
    said = describe(df, leaky, [], "Metadata_Patient", ev)
    assert said.endswith("; 1 fold(s) with Metadata_Patient groups in both training and test (a)")
