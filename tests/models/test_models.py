import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from cellmorph.errors import CellmorphError
from cellmorph.models.factory import create_model, default_input_size, normalization, offline_weights_path


def _classify(model, img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model))
    with torch.no_grad():
        return model((x - mean) / std).softmax(1)[0]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_imagenet_weights_classify_real_photos(name):
    """The key mapping is right only if the mapped model names real photographs correctly."""
    from skimage import data

    assert offline_weights_path(name) is not None
    model = create_model(name, "imagenet", num_classes=1000).eval()
    cat = _classify(model, data.chelsea())  # a tabby cat photo
    assert int(cat.argmax()) in {281, 282, 283, 284, 285}  # ImageNet's domestic cat classes
    assert float(cat[281:286].sum()) > 0.5
    coffee = _classify(model, data.coffee())  # a cup of coffee
    assert int(coffee.argmax()) in {967, 968, 504}  # espresso, cup, coffee mug


def test_backbone_and_head_sizes():
    m = create_model("tf_efficientnet_lite0", "imagenet", num_classes=6)
    assert m.get_classifier().out_features == 6
    ref = create_model("tf_efficientnet_lite0", "imagenet", num_classes=1000)
    assert torch.equal(m.conv_stem.weight, ref.conv_stem.weight)  # backbone kept, head replaced
    feats = create_model("tf_efficientnet_lite0", "imagenet", num_classes=0)
    assert feats(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)
    assert default_input_size("resnet50") == 224 and default_input_size("inception_v3") == 299


def test_no_weights_source_lists_what_was_tried(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CELLMORPH_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(CellmorphError) as e:
        create_model("resnet50", "imagenet", num_classes=6)
    msg = str(e.value)
    assert "resnet50" in msg and "offline package" in msg and "cache" in msg and "CELLMORPH_ALLOW_DOWNLOAD" in msg
    assert "model.init" in msg


def test_hub_cache_is_used(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg("resnet18")
    snap = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    src = timm.create_model("resnet18", pretrained=False)
    save_file(src.state_dict(), str(snap / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    m = create_model("resnet18", "imagenet", num_classes=6)
    assert torch.equal(m.conv1.weight, src.conv1.weight)
    assert m.get_classifier().out_features == 6


def test_xavier_random_and_file_init(tmp_path):
    x = create_model("resnet18", "xavier", num_classes=6)
    w = x.conv1.weight.detach()  # 64 x 3 x 7 x 7
    fan_in, fan_out = w.shape[1] * 49, w.shape[0] * 49
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert float(w.abs().max()) <= bound + 1e-6 and float(w.abs().max()) > 0.8 * bound
    assert float(x.fc.bias.detach().abs().max()) == 0.0
    path = tmp_path / "w.pth"
    torch.save({"state_dict": x.state_dict()}, path)
    y = create_model("resnet18", str(path), num_classes=6)
    assert torch.equal(y.conv1.weight, x.conv1.weight)
    z = create_model("resnet18", str(path), num_classes=3)  # another head size: backbone loads, head fresh
    assert torch.equal(z.conv1.weight, x.conv1.weight) and z.fc.out_features == 3
    with pytest.raises(CellmorphError, match="do not fit"):
        create_model("resnet34", str(path), num_classes=6)


def test_unknown_model_and_bad_init():
    with pytest.raises(CellmorphError, match="unknown model 'resnet5O'"):
        create_model("resnet5O", "xavier")
    with pytest.raises(CellmorphError, match="model.init = 'imagnet'"):
        create_model("resnet18", "imagnet")


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "vgg16"])
def test_paper_architectures_from_scratch(name):
    """Bayramoglu & Heikkilae's networks (torchvision AlexNet/GoogLeNet, timm VGG16) through the one factory."""
    from cellmorph.models.factory import classifier_module

    model = create_model(name, "xavier", num_classes=3).train()
    out = model(torch.rand(2, 3, 64 if name == "alexnet" else 32, 64 if name == "alexnet" else 32))  # AlexNet needs >= 63 px
    assert out.shape == (2, 3)
    head = classifier_module(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert float(head.bias.abs().sum()) == 0.0  # xavier: zero biases
    if name != "vgg16":  # (138 M parameters: one VGG16 per test is enough on a CPU)
        feats = create_model(name, "random", num_classes=0).eval()(torch.rand(1, 3, 64, 64))
        assert feats.shape == (1, {"alexnet": 4096, "googlenet": 1024}[name])


def test_torchvision_imagenet_needs_a_source(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("CELLMORPH_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(CellmorphError, match="no ImageNet weights for 'alexnet'.*torch hub cache"):
        create_model("alexnet", "imagenet", num_classes=3)
    with pytest.raises(CellmorphError, match="no ImageNet weights"):
        create_model("lenet", "imagenet", num_classes=3)


@pytest.mark.parametrize("name", ["alexnet", "gendernet"])
def test_gaussian_init_is_caffes_filler(name):
    """N(0, 0.01) weights in every conv and linear layer, zero biases, from torch's global RNG."""
    torch.manual_seed(0)
    model = create_model(name, "gaussian", num_classes=3)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == {"alexnet": 8, "gendernet": 6}[name]
    for m in layers:
        assert abs(float(m.weight.detach().std()) - 0.01) < 0.001 and abs(float(m.weight.detach().mean())) < 0.001
        assert float(m.bias.detach().abs().max()) == 0.0
    torch.manual_seed(0)
    again = create_model(name, "gaussian", num_classes=3)
    assert torch.equal(layers[0].weight, next(again.parameters()))


def test_gaussian_init_keeps_batch_norm_and_is_a_valid_init():
    from cellmorph.models.factory import check_model_config, gaussian_init_

    for name in ("resnet18", "alexnet"):
        check_model_config(name, "gaussian")
    model = create_model("resnet18", "gaussian", num_classes=2)
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))
    assert abs(float(model.conv1.weight.detach().std()) - 0.01) < 0.001
    gaussian_init_(model, std=0.05)
    assert abs(float(model.fc.weight.detach().std()) - 0.05) < 0.005
    with pytest.raises(CellmorphError, match="'gaussian'"):
        create_model("resnet18", "gausian")
    with pytest.raises(CellmorphError, match="'xavier', 'gaussian' or 'random'"):
        create_model("lenet", "imagenet")
