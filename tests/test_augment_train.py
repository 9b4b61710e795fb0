import numpy as np
import torch

from cellmorph.augment import augment, blur3x3, channel_jitter, dihedral, gaussian_noise, random_dihedral
from cellmorph.config import AugmentConfig, FinetuneConfig
from cellmorph.models import create_model
from cellmorph.train import InputSpec, class_weights, fit, predict_proba


def test_dihedral_group_has_eight_distinct_elements():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for v in views:  # a permutation of pixels within each channel
        assert torch.equal(v.sort(dim=-1).values.sum(), x.sort(dim=-1).values.sum())


def test_random_dihedral_per_sample():
    x = torch.arange(64 * 16, dtype=torch.float32).view(64, 1, 4, 4)
    y = random_dihedral(x, torch.Generator().manual_seed(0))
    kinds = set()
    for i in range(64):
        match = [k for k in range(8) if torch.equal(dihedral(x[i : i + 1], k), y[i : i + 1])]
        assert len(match) == 1
        kinds.add(match[0])
    assert len(kinds) == 8  # every transform drawn somewhere in the batch


def test_jitter_blur_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.full((16, 3, 8, 8), 0.5)
    j = channel_jitter(x, 0.1, 0.05, g)
    per_channel = j[:, :, 0, 0]
    assert torch.allclose(j, per_channel[:, :, None, None].expand_as(j))  # constant per image and channel
    assert (per_channel - 0.5).abs().max() <= 0.5 * 0.1 + 0.05 + 1e-6 and per_channel.std() > 0
    assert torch.allclose(blur3x3(x), x)  # a flat image stays flat
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1
    b = blur3x3(spike)
    assert abs(float(b.sum()) - 1) < 1e-6 and float(b[0, 0, 2, 2]) == 0.25
    assert torch.equal(gaussian_noise(x, 0.0, g), x)
    assert not torch.equal(gaussian_noise(x, 0.05, g), x)
    out = augment(torch.rand(8, 3, 16, 16), AugmentConfig(), g)
    assert out.min() >= 0 and out.max() <= 1


def test_class_weights_balanced():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2, 0.0]))


def test_finetune_learns_a_trivial_task_on_cpu():
    """Bright vs dark images: a few epochs of the real loop must separate them."""
    torch.manual_seed(0)
    n = 32
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    labels = np.arange(n) % 2
    images[labels == 1] = 200
    images[labels == 0] = 30
    model = create_model("resnet18", "xavier", num_classes=2)
    spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = FinetuneConfig(epochs=4, batch_size=16, optimizer="adam", lr=1e-3, augment=AugmentConfig(blur_p=0.5))
    hist = fit(model, images, labels, 2, cfg, spec, torch.device("cpu"), seed=0)
    assert len(hist.loss) == 4 and hist.loss[-1] < hist.loss[0]
    probs = predict_proba(model, images, spec, torch.device("cpu"))
    assert probs.shape == (n, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() == 1.0


def test_raw_normalisation_feeds_0_255():
    spec = InputSpec(size=0, mean=(0.5,), std=(0.5,), normalize_mode="raw")
    assert float(spec(torch.ones(1, 1, 4, 4)).max()) == 255.0


def test_uint8_hot_path_matches_float_path_statistics():
    from cellmorph.augment import augment_uint8

    cfg = AugmentConfig(dihedral=False, jitter_scale=0.0, jitter_shift=0.0, blur_p=0.0, noise_std=0.0)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(augment_uint8(x, cfg), x.float() / 255)  # identity settings: just the scaling
    y = augment_uint8(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x.float() / 255)
    d = augment_uint8(x, AugmentConfig(jitter_scale=0, jitter_shift=0, blur_p=0, noise_std=0), torch.Generator().manual_seed(0))
    assert any(torch.allclose(d[0], dihedral(x[:1].float() / 255, k)[0]) for k in range(8))


def test_normalize_is_mean_std():
    spec = InputSpec(size=0, mean=(0.2, 0.4), std=(0.5, 0.25))
    x = torch.rand(2, 2, 3, 3)
    ref = (x - torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    assert torch.allclose(spec(x), ref, atol=1e-6)
