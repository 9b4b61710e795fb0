from pathlib import Path
"""A tiny CPU fine-tune on real images with every per-epoch output switched on, then the
`summarize` and `explain` verbs on its run folders."""

import numpy as np
import pytest

from cellmorph.config import load_config
from cellmorph.errors import CellmorphError
from cellmorph.engine.runner import run_experiment
from cellmorph.evaluation.metrics import Metrics
from cellmorph.reporting.summary import summarize_runs

REPO = Path(__file__).resolve().parents[2]

SMOKE = REPO / "configs" / "finetune-cpu-smoke.toml"
TINY = ["dataset.image_size=32", "model.input_size=32", "finetune.epochs=2", "finetune.eval_every_epoch=true", "finetune.save_models=true", "model.name=resnet18", "model.init=xavier",
        "finetune.batch_size=64", "save_model=false"]  # few optimiser steps, no final model: the folds are what is tested


@pytest.fixture(scope="module")
def tiny_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    runs = []
    for seed, protocol in ((0, "loco"), (1, "loco"), (0, "lcbo")):
        out = root / f"{protocol}-{seed}"
        cfg = load_config(SMOKE, [*TINY, f"seed={seed}", f"evaluation.protocol={protocol}"])
        run_experiment(cfg, out, data_dir)
        runs.append(out)
    return runs


def test_epoch_curves_and_saved_models(tiny_runs):
    m = Metrics.read(tiny_runs[0] / "metrics.json")
    assert [c["epoch"] for c in m.curve] == [1, 2]
    assert m.curve[-1]["image"] == pytest.approx(m.level("image").accuracy)  # last epoch = final
    assert m.curve[-1]["treatment"] == pytest.approx(m.level("treatment").accuracy)
    assert np.load(tiny_runs[0] / "folds" / "00" / "curve_probs.npy").shape[0] == 2
    assert (tiny_runs[0] / "folds" / "01" / "model.pt").is_file()
    lcbo = Metrics.read(tiny_runs[2] / "metrics.json")
    assert lcbo.protocol == "lcbo" and lcbo.headline_level == "treatment"
    assert sorted(e["group"] for e in lcbo.excluded) == ["mevinolin/lovastatin", "simvastatin"]


def test_summarize_pools_seeds(tiny_runs, tmp_path):
    t = summarize_runs(tiny_runs, tmp_path / "sum")
    loco = t[(t.protocol == "loco") & (t.level == "treatment")].iloc[0]
    assert loco.seeds == "0,1" and not np.isnan(loco.accuracy_sem)
    seeds = [Metrics.read(r / "metrics.json").level("treatment").accuracy for r in tiny_runs[:2]]
    assert loco.accuracy_mean == pytest.approx(np.mean(seeds), abs=1e-4)
    assert set(t[t.protocol == "lcbo"].level) == {"treatment", "well", "image"}
    assert (tmp_path / "sum" / "curves.png").stat().st_size > 10_000
    assert "± " in (tmp_path / "sum" / "summary.md").read_text()
    with pytest.raises(CellmorphError, match="metrics.json: not found"):
        summarize_runs([tmp_path / "nothing"], tmp_path / "sum2")


def test_explain_before_after_and_gradcam(tiny_runs, data_dir, tmp_path):
    from cellmorph.reporting.explain import explain_run

    cfg = load_config(SMOKE, [*TINY, "seed=0"])
    info = explain_run(cfg, tiny_runs[0] / "folds" / "00" / "model.pt", tmp_path / "x", data_dir, layers=["layer1", "layer3"], filters=[0, 1], n_images=3, steps=4, am_size=32, device_name="cpu")
    assert info["held_out"] == "AZ-A" and len(info["images"]) == 3
    assert (tmp_path / "x" / "activation_maximization.png").stat().st_size > 5_000
    assert (tmp_path / "x" / "gradcam.png").stat().st_size > 5_000
    with pytest.raises(CellmorphError, match="layer 'nope' not in the model"):
        explain_run(cfg, tiny_runs[0] / "folds" / "00" / "model.pt", tmp_path / "y", data_dir, layers=["nope"], steps=1, device_name="cpu")


def test_activation_maximization_raises_the_activation():
    import torch

    from cellmorph.reporting.explain import activation_maximization, grad_cam
    from cellmorph.models.factory import create_model
    from cellmorph.models.train import InputSpec

    torch.manual_seed(0)
    model = create_model("resnet18", "xavier", num_classes=3).eval()
    spec = InputSpec(size=0, mean=(0.5,) * 3, std=(0.25,) * 3)
    acts = {}
    model.layer2[1].conv2.register_forward_hook(lambda m, i, o: acts.__setitem__("o", o))
    grey = torch.full((1, 3, 48, 48), 0.5)
    with torch.no_grad():
        model(spec(grey))
    start = float(acts["o"][0, 5].mean())
    img = activation_maximization(model, "layer2.1.conv2", [5], spec, size=48, steps=30, device=torch.device("cpu"))
    with torch.no_grad():
        model(spec(torch.from_numpy(img)))
    assert float(acts["o"][0, 5].mean()) > start + 0.1
    cams, pred = grad_cam(model, spec(torch.rand(2, 3, 48, 48)))
    assert cams.shape == (2, 48, 48) and cams.max() <= 1 + 1e-6 and cams.min() >= 0 and pred.shape == (2,)


def test_set_overrides(tmp_path):
    cfg = load_config(SMOKE, ["seed=3", "evaluation.protocol=lcbo", "model.init=xavier"])
    assert cfg.seed == 3 and cfg.evaluation.protocol == "lcbo" and cfg.model.init == "xavier"
    with pytest.raises(CellmorphError, match="KEY=VALUE"):
        load_config(SMOKE, ["seed"])
    with pytest.raises(CellmorphError, match="evaluation.protocl"):
        load_config(SMOKE, ["evaluation.protocl=lcbo"])


def test_explain_and_summarize_on_a_run_without_treatments(data_dir, tmp_path):
    """Nuclei (no compounds, no wells): explain picks the fold's held-out nuclei, summarize reads the image level."""
    from cellmorph.reporting.explain import explain_run

    cfg = load_config(REPO / "configs" / "nuclei" / "scratch-image-grouped.toml",
                      ["dataset.options.max_images=3", "model.name=resnet18", "model.input_size=32", "finetune.epochs=1",
                       "finetune.eval_every_iterations=0", "finetune.save_models=true", "device=cpu"])
    out = tmp_path / "nuclei"
    run_experiment(cfg, out, data_dir)
    info = explain_run(cfg, out / "folds" / "00" / "model.pt", tmp_path / "x", data_dir, layers=["layer1"], filters=[0], n_images=2, steps=2, am_size=32, device_name="cpu")
    assert info["held_out"] == "image-grouped" and len(info["images"]) == 2
    assert (tmp_path / "x" / "gradcam.png").stat().st_size > 1_000
    t = summarize_runs([out], tmp_path / "sum")
    m = Metrics.read(out / "metrics.json").level("image")
    assert list(t.level) == ["image"] and t.iloc[0].correct == f"{m.correct}/{m.total}"
