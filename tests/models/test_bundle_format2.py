"""A bundle saved by cellmorph before the subpackage layout (format 2, commit dfcbb0e: a frozen timm
`test_efficientnet` with a random backbone, a logistic head on 3 classes and a calibration table) still loads
and predicts what it predicted when it was saved: to float rounding (1e-5), since frozen backbones now run with
their batch norms folded into the convolutions (`train.fold_batch_norm`), which changes the last bits only."""

import json
from pathlib import Path

import numpy as np

import cellmorph as cm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_format2_bundle_from_before_the_move_predicts_identically():
    want = json.loads((FIXTURES / "bundle-format2-expected.json").read_text())
    x = np.random.default_rng(want["input_seed"]).integers(0, 256, want["input_shape"], dtype=np.uint8)
    clf = cm.Classifier.load(FIXTURES / "bundle-format2")
    assert clf.classes == want["classes"] and clf.channels == 3
    assert json.loads((FIXTURES / "bundle-format2" / "bundle.json").read_text())["format_version"] == 2
    got = clf.predict_proba(x)
    saved = np.array([[float.fromhex(v) for v in r] for r in want["probs_hex"]])
    assert got.shape == saved.shape and np.abs(got - saved).max() < 1e-5, np.abs(got - saved).max()
    assert clf.calibration is not None and len(clf.calibration) == 3


def test_batch_norm_folding_keeps_the_backbone_and_its_outputs():
    """The folded copy is another module (the backbone's state dict stays timm's, for saving) and gives the
    backbone's outputs to float rounding; a network without conv -> batch norm pairs comes back as it is."""
    import torch
    from torch import nn

    from cellmorph.models.factory import create_model
    from cellmorph.models.train import fold_batch_norm

    torch.manual_seed(0)
    net = create_model("test_efficientnet", "random", num_classes=0, in_chans=3).eval()
    for m in net.modules():  # non-trivial running statistics, so folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    keys = sorted(net.state_dict())
    fast = fold_batch_norm(net)
    assert fast is not net and sorted(net.state_dict()) == keys
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        ref, out = net(x), fast(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5) and not torch.equal(out, ref)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    assert fold_batch_norm(linear) is linear
