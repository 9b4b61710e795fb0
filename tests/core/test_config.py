from pathlib import Path
import tomllib

import pytest

from cellmorph.config import ExperimentConfig, dump_toml, load_config, parse_config
from cellmorph.errors import CellmorphError

REPO = Path(__file__).resolve().parents[2]


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


def test_base_inheritance_and_paper_configs_differ_only_in_recipe():
    paper, tuned = load_config(REPO / "configs" / "paper" / "resnet50.toml"), load_config(REPO / "configs" / "tuned" / "resnet50.toml")
    assert (paper.model, paper.dataset, paper.evaluation) == (tuned.model, tuned.dataset, tuned.evaluation)
    assert (paper.finetune.batch_size, paper.finetune.lr, tuned.finetune.batch_size, tuned.finetune.lr) == (8, 1e-4, 32, 0.01)


def test_base_cycle_and_missing_base(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(CellmorphError, match="cycle"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(CellmorphError, match="nowhere.toml"):
        load_config(tmp_path / "c.toml")


def test_override_typos_name_the_override_not_the_file():
    from cellmorph.config import override

    with pytest.raises(CellmorphError) as e:
        load_config(REPO / "configs" / "quickstart.toml", ["evaluation.protocl=lcbo"])
    assert "--set" in str(e.value) and "evaluation.protocl" in str(e.value) and "Fix the override" in str(e.value)
    with pytest.raises(CellmorphError, match="evaluation.protocl"):
        override(ExperimentConfig(), {"evaluation.protocl": "lcbo"})
    assert override(ExperimentConfig(), {"evaluation.protocol": "lcbo"}).evaluation.protocol == "lcbo"


def test_seed_list_and_eval_epochs_validated():
    assert parse_config({"seeds": [3, 4]}).seed_list == [3, 4] and parse_config({"seed": 2}).seed_list == [2]
    with pytest.raises(CellmorphError, match="repeat"):
        parse_config({"seeds": [1, 1]})
    with pytest.raises(CellmorphError, match="eval_epochs"):
        parse_config({"finetune": {"epochs": 2, "eval_epochs": [5]}})
