"""The course lab's LeNet-inspired CNN: exact parameter count and shapes."""

import torch

from cellmorph.models.lenet import LeNet
from cellmorph.models.factory import classifier_module, create_model, default_input_size


def test_parameter_count_is_the_labs():
    model = create_model("lenet", "xavier", num_classes=6)
    assert sum(p.numel() for p in model.parameters()) == 1_121_062
    first = model.features[0]
    assert sum(p.numel() for p in first.parameters()) == 1_216  # 5*5*3*16 + 16
    # every layer as the lab lists it
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] == [
        (16, 3, 5, 5), (32, 16, 5, 5), (64, 32, 5, 5), (1024, 1024), (6, 1024)
    ]
    assert default_input_size("lenet") == 256 and classifier_module(model) is model.fc2


def test_shapes_and_flatten_size():
    model = LeNet(num_classes=6).eval()
    x = torch.rand(2, 3, 256, 256)
    assert model.features(x).shape == (2, 1024)  # flatten = 4 x 4 x 64
    assert model(x).shape == (2, 6)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 6)  # other sizes work (adaptive last pool)
    assert LeNet(num_classes=0)(x).shape == (2, 1024)


def test_dropout_variant_changes_training_output_only():
    torch.manual_seed(0)
    model = create_model("lenet", "random", num_classes=6, drop_rate=0.5)
    x = torch.rand(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
