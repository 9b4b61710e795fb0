"""The contract a model family fulfils to be trained, read for features, embedded and explained by cellmorph
(docs/architecture.md, "The Backbone contract"). timm's models fulfil it as they are; cellmorph's own networks
(LeNet, GenderNet) implement it by hand.

Example:
    >>> from cellmorph.models.backbone import check_backbone
    >>> check_backbone(create_model("lenet", "xavier", num_classes=6), in_chans=3, size=64)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from cellmorph.errors import CellmorphError


@runtime_checkable
class Backbone(Protocol):
    """What cellmorph calls on a network (besides nn.Module's own methods).

    - `forward(x)`: N x C x S x S normalised float -> N x num_classes logits (the pooled features when
      num_classes = 0);
    - `forward_features(x)` then `forward_head(f, pre_logits=True)`: the N x num_features features the
      classifier reads (frozen features, embeddings, MC dropout's head);
    - `get_classifier()`: the task-specific output layer (its own learning rate); `reset_classifier(n)`;
    - the module defining the family has `INPUT_SIZE` (or timm's pretrained config gives it), and its
      constructor takes `num_classes`, `in_chans` and `drop_rate`."""

    num_classes: int
    num_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...


class LinearHead:
    """The head half of the Backbone contract for a network whose classifier is one nn.Linear (`HEAD`, an
    attribute name) after a dropout (`HEAD_DROP`), reading `num_features` pooled features from
    `forward_features`: cellmorph's own networks (LeNet, GenderNet) mix it in."""

    HEAD: str = "fc"
    HEAD_DROP: str = "drop"

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.HEAD)

    def reset_classifier(self, num_classes: int) -> None:
        """A new output layer for `num_classes` classes (0: none, the network returns its features)."""
        self.num_classes = num_classes
        setattr(self, self.HEAD, nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity())

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features -> logits (timm's signature); `pre_logits=True`: the features the classifier reads."""
        return x if pre_logits else getattr(self, self.HEAD)(getattr(self, self.HEAD_DROP)(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class StagePooled(nn.Module):
    """frozen.features = "stages": a backbone's pooled features (`forward_head(..., pre_logits=True)`) preceded by the
    global average of each of its stages' outputs (timm's `forward_intermediates`, one per `feature_info` entry), in
    one pass: small textures (a 27-pixel nucleus, say) live in the early stages, which the last layer has pooled away.
    For tf_efficientnet_lite0: 16 + 24 + 40 + 112 + 320 stage channels + 1,280 = 1,792 features per image.

        >>> StagePooled(fold_batch_norm(create_model("tf_efficientnet_lite0"))).eval()(x).shape
        torch.Size([N, 1792])"""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not hasattr(net, "forward_intermediates") or not getattr(net, "feature_info", None):
            raise CellmorphError(f"frozen.features = \"stages\" needs a timm network with forward_intermediates and feature_info; "
                                 f"{type(net).__name__} has none. Use frozen.features = \"last\".")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, stages = self.net.forward_intermediates(x, indices=len(self.net.feature_info))
        return torch.cat([s.mean(dim=(2, 3)) for s in stages] + [self.net.forward_head(final, pre_logits=True)], dim=1)


def frozen_width(net: nn.Module, stages: bool) -> int | None:
    """The width of the frozen features `net` gives: its num_features, plus its stages' channels with `stages`."""
    width = getattr(net, "num_features", None)
    if not stages or width is None:
        return width
    return width + sum(int(f["num_chs"]) for f in net.feature_info)


def check_backbone(model: nn.Module, in_chans: int = 3, size: int = 64) -> None:
    """Raise a CellmorphError naming what `model` lacks of the Backbone contract, or what it computes wrong
    (shapes of the logits and the pre-logit features on a batch of 2 zero images)."""
    name = type(model).__name__
    if not isinstance(model, Backbone):
        missing = [m for m in ("num_classes", "num_features", "forward_features", "forward_head", "get_classifier", "reset_classifier")
                   if not hasattr(model, m)]
        raise CellmorphError(f"{name} does not fulfil the Backbone contract: missing {', '.join(missing)} (cellmorph.models.backbone).")
    x = torch.zeros(2, in_chans, size, size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
    finally:
        model.train(was)
    want = (2, model.num_classes) if model.num_classes else (2, model.num_features)
    if tuple(logits.shape) != want or tuple(feats.shape) != (2, model.num_features):
        raise CellmorphError(f"{name}: forward gives {tuple(logits.shape)} (expected {want}) and pre-logit features "
                             f"{tuple(feats.shape)} (expected (2, {model.num_features})).")
