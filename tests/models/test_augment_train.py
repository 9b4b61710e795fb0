import numpy as np
import pytest
import torch

from cellmorph.models.augment import augment, blur3x3, dihedral, gaussian_noise, random_dihedral
from cellmorph.config import AugmentConfig, FinetuneConfig
from cellmorph.models.factory import create_model
from cellmorph.models.train import InputSpec, class_weights, fit, make_optimizer, predict_proba


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
    jitter_only = AugmentConfig(dihedral=False, jitter_scale=0.1, jitter_shift=0.05, blur_p=0.0, noise_std=0.0)
    j = augment(torch.full((16, 3, 8, 8), 128, dtype=torch.uint8), jitter_only, g)
    per_channel = j[:, :, 0, 0]
    assert torch.allclose(j, per_channel[:, :, None, None].expand_as(j))  # constant per image and channel
    assert (per_channel - 128 / 255).abs().max() <= 128 / 255 * 0.1 + 0.05 + 1e-6 and per_channel.std() > 0
    assert torch.allclose(blur3x3(x), x)  # a flat image stays flat
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1
    b = blur3x3(spike)
    assert abs(float(b.sum()) - 1) < 1e-6 and float(b[0, 0, 2, 2]) == 0.25
    assert torch.equal(gaussian_noise(x, 0.0, g), x)
    assert not torch.equal(gaussian_noise(x, 0.05, g), x)
    out = augment(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), AugmentConfig(), g)
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


def test_augment_takes_uint8_and_scales_to_unit_range():
    cfg = AugmentConfig(dihedral=False, jitter_scale=0.0, jitter_shift=0.0, blur_p=0.0, noise_std=0.0)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(augment(x, cfg), x.float() / 255)  # identity settings: just the scaling
    y = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x.float() / 255)
    d = augment(x, AugmentConfig(jitter_scale=0, jitter_shift=0, blur_p=0, noise_std=0), torch.Generator().manual_seed(0))
    assert any(torch.allclose(d[0], dihedral(x[:1].float() / 255, k)[0]) for k in range(8))


def test_normalize_is_mean_std():
    spec = InputSpec(size=0, mean=(0.2, 0.4), std=(0.5, 0.25))
    x = torch.rand(2, 2, 3, 3)
    ref = (x - torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    assert torch.allclose(spec(x), ref, atol=1e-6)
    assert torch.allclose(spec(x), ref, atol=1e-6) and len(spec._affine) == 1  # constants made once, reused


def _tiny():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_layer_lr_multipliers_and_inv_schedule():
    from cellmorph.models.train import make_optimizer, make_scheduler

    model = _tiny()
    cfg = FinetuneConfig(lr=0.001, head_lr_mult=10.0, backbone_lr_mult=1.0, schedule="inv", inv_gamma=0.001, inv_power=0.75)
    opt = make_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.01) and groups["backbone"]["lr"] == pytest.approx(0.001)
    assert {id(p) for p in groups["head"]["params"]} == {id(model[3].weight), id(model[3].bias)}
    sched = make_scheduler(opt, cfg, total_steps=100)
    for _ in range(1000):
        opt.step()
        sched.step()
    # Caffe "inv": base * (1 + gamma * iter) ^ -power, per group
    assert groups["backbone"]["lr"] == pytest.approx(0.001 * (1 + 0.001 * 1000) ** -0.75)
    assert groups["head"]["lr"] == pytest.approx(0.01 * 2**-0.75)
    assert len(make_optimizer(model, FinetuneConfig()).param_groups) == 1  # defaults: today's behaviour


def test_mean_subtraction_uses_training_images():
    from cellmorph.models.train import channel_mean, make_input_spec

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255
    images[:, 1] = 51
    assert channel_mean(images) == pytest.approx((1.0, 0.2, 0.0))
    spec = make_input_spec(_tiny(), 0, "mean", images)
    out = spec(images.float() / 255)
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)  # the mean image maps to zero


def test_iteration_hook_and_one_sample_tail():
    from cellmorph.models.factory import create_model as cm

    seen = []
    images = torch.randint(0, 255, (11, 3, 16, 16), dtype=torch.uint8)
    labels = np.arange(11) % 2
    cfg = FinetuneConfig(epochs=2, batch_size=5, optimizer="sgd", lr=0.01, augment=AugmentConfig(dihedral=False, blur_p=0.0))
    model = cm("tf_efficientnet_lite0", "random", num_classes=2)  # batch norm: a batch of 1 would fail
    spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    fit(model, images, labels, 2, cfg, spec, torch.device("cpu"), seed=0, on_iteration=lambda it, m: seen.append((it, m.training)))
    assert seen == [(i, True) for i in range(1, 5)]  # 11 = 5 + 5 + (1 dropped), two epochs


def _he_patches(data_dir, n=4):
    import glob

    from PIL import Image

    files = sorted(glob.glob(str(data_dir / "crchistophenotypes" / "img*" / "img*.png")))[:n]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"))[:96, :96].transpose(2, 0, 1) for f in files]))


def test_hed_jitter_is_identity_at_zero_and_recolours_real_he_patches_keeping_their_structure(data_dir):
    """Stain jitter on real H&E fields (CRCHistoPhenotypes): alpha 1, beta 0 gives the image back; sigma 0.05 changes
    each image's colour by a few grey levels on average, never its structure (the Laplacian stays correlated)."""
    from cellmorph.models.augment import hed_jitter

    x = _he_patches(data_dir).float() / 255
    same = hed_jitter(x, 0.05, alpha=torch.ones(len(x), 3), beta=torch.zeros(len(x), 3))
    assert (same - x.clamp_min(1e-6)).abs().max() < 1e-5
    y = hed_jitter(x, 0.05, torch.Generator().manual_seed(0))
    change = (y - x).abs().mean(dim=(1, 2, 3))
    print("mean |change| per image (0-1 scale):", change.numpy().round(4))
    assert (change > 0.002).all() and (change < 0.1).all()

    def lap(t):
        g = t.mean(1)
        return (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]).flatten(1)

    for a, b in zip(lap(x), lap(y)):
        assert np.corrcoef(a.numpy(), b.numpy())[0, 1] > 0.9


def test_hed_jitter_in_the_training_augmentation_and_refused_for_fluorescence(data_dir):
    from cellmorph.config import AugmentConfig
    from cellmorph.errors import CellmorphError

    x = _he_patches(data_dir)
    out = augment(x, AugmentConfig(hed_jitter=0.05), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    with pytest.raises(CellmorphError, match="needs RGB"):
        augment(x[:, :1], AugmentConfig(hed_jitter=0.05))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_cpu_optimizers_are_fused_and_take_the_same_steps(name):
    """On CPU the optimizer is torch's fused kernel, and its steps are those of torch's per-tensor loop."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, init="random")
    twin = create_model("resnet18", num_classes=3, init="random")
    twin.load_state_dict(model.state_dict())
    cfg = FinetuneConfig(optimizer=name, lr=1e-3, weight_decay=1e-4)
    fused = make_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    same = {k: v for k, v in fused.defaults.items() if k != "decoupled_weight_decay"}  # AdamW's own, not an argument
    loop = type(fused)(twin.parameters(), **{**same, "fused": None, "foreach": False})
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients for both: only the update rule (and rounding) can differ
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for net, opt in ((model, fused), (twin, loop)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), twin.parameters()))
    assert worst < 1e-6, worst
