"""Levi & Hassner's GenderNet: exact parameter count, Caffe's shapes, training from scratch on CPU."""

import numpy as np
import pytest
import torch

from cellmorph.config import AugmentConfig, FinetuneConfig
from cellmorph.errors import CellmorphError
from cellmorph.models.gendernet import GenderNet
from cellmorph.models.factory import classifier_module, create_model, default_input_size, normalization
from cellmorph.models.train import fit, make_input_spec


def test_parameter_count_and_layers():
    model = create_model("gendernet", "gaussian", num_classes=2)
    assert sum(p.numel() for p in model.parameters()) == 11_411_970
    assert sum(p.numel() for p in model.features[0].parameters()) == 96 * 3 * 7 * 7 + 96
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] == [
        (96, 3, 7, 7), (256, 96, 5, 5), (384, 256, 3, 3), (512, 7 * 7 * 384), (512, 512), (2, 512)
    ]
    lrn = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
    assert [(m.size, m.alpha, m.beta, m.k) for m in lrn] == [(5, 1e-4, 0.75, 1.0)] * 2
    assert default_input_size("gendernet") == 227 and classifier_module(model) is model.fc8
    assert normalization(model) == normalization(create_model("lenet", "random", num_classes=2))
    assert model.drop6.p == model.drop7.p == 0.5
    assert GenderNet(drop_rate=0.2).drop6.p == 0.2


def test_caffe_shapes_at_227_and_64_px():
    model = GenderNet(num_classes=2).eval()
    x = torch.rand(1, 3, 227, 227)
    sizes = []
    for layer in model.features[:11]:  # up to Caffe's pool3, before the adaptive pool
        x = layer(x)
        sizes.append(tuple(x.shape[-2:]))
    assert sizes[::2] == [(56, 56), (28, 28), (28, 28), (14, 14), (14, 14), (7, 7)]  # conv, pool, conv, pool, conv, pool
    assert torch.equal(model.features[11](x), x)  # the adaptive pool is the identity at 227 px
    assert model(torch.rand(2, 3, 227, 227)).shape == (2, 2)
    small = torch.rand(2, 3, 64, 64)
    pooled = model.features[:11](small)
    assert pooled.shape == (2, 384, 1, 1)
    assert torch.equal(model.features(small).view(2, 384, 49), pooled.view(2, 384, 1).expand(2, 384, 49))  # copied to 7 x 7
    assert model(small).shape == (2, 2)
    assert GenderNet(num_classes=0).eval()(small).shape == (2, 512)


def test_trains_from_scratch_on_cpu():
    """Three brightness classes: a few SGD steps from the Gaussian init must lower the loss."""
    torch.manual_seed(0)
    n = 12
    labels = np.arange(n) % 3
    base = torch.tensor([30, 120, 210])[labels].view(n, 1, 1, 1)
    images = (base + torch.randint(-20, 21, (n, 3, 32, 32))).to(torch.uint8)
    model = create_model("gendernet", "gaussian", num_classes=3)
    before = [p.detach().clone() for p in model.parameters()]
    # normalize = "caffe": Caffe's input scale (mean-subtracted 0-255 pixels), which N(0, 0.01) weights were chosen for.
    spec = make_input_spec(model, 64, "caffe", images)
    x = spec.normalize(images.float() / 255)
    assert abs(float(x.mean())) < 0.5 and float(x.std()) > 20  # centred (within float32 rounding), on the 0-255 scale
    cfg = FinetuneConfig(epochs=3, batch_size=6, optimizer="sgd", lr=0.01, augment=AugmentConfig(blur_p=0.0))
    hist = fit(model, images, labels, 3, cfg, spec, torch.device("cpu"), seed=0)
    assert all(np.isfinite(hist.loss)) and hist.loss[-1] < hist.loss[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_imagenet_weights():
    with pytest.raises(CellmorphError, match="no ImageNet weights.*'gaussian'"):
        create_model("gendernet", "imagenet", num_classes=2)
