import tomllib

import pytest

from cellmorph.config import ExperimentConfig, dump_toml, load_config, parse_config
from cellmorph.errors import CellmorphError
from tests.conftest import REPO


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.toml"))
    assert paths, "no configs shipped"
    for p in paths:
        load_config(p)


def test_typo_names_field_and_file(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text('[model]\nnmae = "resnet50"\n')
    with pytest.raises(CellmorphError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "model.nmae" in str(e.value) and "unknown field" in str(e.value)


def test_wrong_type_names_field(tmp_path):
    p = tmp_path / "type.toml"
    p.write_text('[finetune]\nepochs = "ten"\n')
    with pytest.raises(CellmorphError, match="finetune.epochs"):
        load_config(p)


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = \n")
    with pytest.raises(CellmorphError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(CellmorphError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_dump_round_trips():
    cfg = parse_config({"name": "x", "dataset": {"options": {"csv": "a.csv"}}, "finetune": {"augment": {"blur_p": 0.5}}})
    again = ExperimentConfig.model_validate(tomllib.loads(dump_toml(cfg)))
    assert again == cfg
