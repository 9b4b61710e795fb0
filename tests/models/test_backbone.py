"""The Backbone contract (cellmorph.models.backbone): every model family cellmorph ships fulfils all of it."""

import pytest
import torch

from cellmorph.errors import CellmorphError
from cellmorph.models.backbone import Backbone, check_backbone
from cellmorph.models.factory import create_model, default_input_size, pre_logits


@pytest.mark.parametrize("name,size", [("lenet", 64), ("gendernet", 96), ("tf_efficientnet_lite0", 32)])
@pytest.mark.parametrize("in_chans", [3, 5])
def test_model_families_fulfil_the_backbone_contract(name, size, in_chans):
    model = create_model(name, "random", num_classes=4, in_chans=in_chans)
    assert isinstance(model, Backbone)
    check_backbone(model, in_chans=in_chans, size=size)
    assert default_input_size(name) > 0
    model.reset_classifier(0)  # features only: forward gives the pooled features
    check_backbone(model, in_chans=in_chans, size=size)
    x = torch.rand(2, in_chans, size, size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pre_logits(model, name)(x))


def test_a_network_missing_part_of_the_contract_is_named():
    with pytest.raises(CellmorphError, match="missing num_classes, num_features, forward_features, forward_head"):
        check_backbone(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)), size=8)
