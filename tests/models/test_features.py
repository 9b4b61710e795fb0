from pathlib import Path
"""Frozen features: channels_last on CPU gives the contiguous layout's features (to float rounding),
the dihedral TTA is a mean over the 8 transforms, and the frozen-speed benchmark runs end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cellmorph.models.augment import dihedral
from cellmorph.models.train import InputSpec, forward_batches

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def subset_images(subset_table):
    from cellmorph.data.store import build_store

    store = build_store(subset_table, 0)
    return torch.from_numpy(np.ascontiguousarray(store.images[:6]))  # 6 real images, 256 x 256 uint8


@pytest.fixture(scope="module")
def lite0():
    from cellmorph.models.factory import create_model, normalization

    model = create_model("tf_efficientnet_lite0", "imagenet", num_classes=0)
    mean, std = normalization(model)
    return model, InputSpec(size=224, mean=mean, std=std)


def _contiguous_reference(model: nn.Module, images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """The old CPU path: contiguous weights and inputs, no_grad."""
    with torch.no_grad():
        return model.eval()(spec(images.float().div(255)).contiguous())


def test_channels_last_features_match_contiguous(lite0, subset_images):
    model, spec = lite0
    ref = _contiguous_reference(model, subset_images, spec)
    stem = model.conv_stem.weight
    assert stem.is_contiguous()
    feats = forward_batches(model, subset_images, spec, torch.device("cpu"), batch_size=4)  # a partial last batch too
    assert feats.shape == ref.shape == (6, 1280) and feats.dtype == torch.float32
    assert torch.allclose(feats, ref, atol=1e-4, rtol=0), (feats - ref).abs().max()
    assert not feats.is_inference()  # usable outside inference_mode (e.g. torch.cat with training tensors)
    # The model comes back as it went in: contiguous, ordinary (trainable) parameters.
    assert model.conv_stem.weight.is_contiguous() and not model.conv_stem.weight.is_inference()
    assert all(p.requires_grad for p in model.parameters())


def test_tta_features_are_the_mean_over_the_dihedral_group(lite0, subset_images):
    model, spec = lite0
    images = subset_images[:2]
    tta = forward_batches(model, images, spec, torch.device("cpu"), batch_size=2, tta=True)
    x = spec(images.float().div(255))
    with torch.no_grad():
        ref = torch.stack([model(dihedral(x, k).contiguous()) for k in range(8)]).mean(0)
    assert torch.allclose(tta, ref, atol=1e-4, rtol=0), (tta - ref).abs().max()
    # Invariance: the TTA features of a dihedrally transformed image equal the original's (the group
    # permutes its own views), up to float rounding and the resize's pixel grid (224 from 256 commutes
    # with rotations and mirrors).
    for k in (1, 5):
        moved = forward_batches(model, dihedral(images, k).contiguous(), spec, torch.device("cpu"), batch_size=2, tta=True)
        assert torch.allclose(moved, tta, atol=1e-4, rtol=0), (k, (moved - tta).abs().max())


def test_forward_batches_cpu_model_still_trains_after(subset_images):
    """predict_proba during CPU fine-tuning: inference_mode must not leave inference tensors behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = InputSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    forward_batches(model, subset_images[:3], spec, torch.device("cpu"), batch_size=2)
    assert model[0].weight.is_contiguous()
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert model[0].weight.grad is not None


def test_frozen_speed_cpu_smoke(data_dir, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import frozen_speed
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    line = frozen_speed.main(["--device", "cpu", "--n", "40", "--batch", "16", "--size", "32", "--repeats", "1", "--head-folds", "2", "--data", str(data_dir)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == line  # one JSON line on stdout
    assert line["device"] == "cpu" and line["images"] == 40 and line["size"] == 32 and line["feature_dim"] == 1280
    for key in ("bare_img_s", "cellmorph_img_s", "head_s_per_fold"):
        assert line[key] > 0, key
    assert line["ratio"] == pytest.approx(line["cellmorph_img_s"] / line["bare_img_s"], rel=0.02)
    assert 1 <= line["head_folds"] <= 2
