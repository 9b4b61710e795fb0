"""GenderNet (Levi & Hassner, "Age and Gender Classification using Convolutional Neural Networks",
CVPR Workshops 2015), the small CNN that Bayramoglu & Heikkilae (2016) trained on nucleus images.

    conv1 7x7x96 stride 4 + ReLU -> max-pool 3/2 -> LRN (5, 1e-4, 0.75) ->
    conv2 5x5x256 pad 2 + ReLU -> max-pool 3/2 -> LRN (5, 1e-4, 0.75) ->
    conv3 3x3x384 pad 1 + ReLU -> max-pool 3/2 -> flatten (7 x 7 x 384 = 18,816) ->
    fc6 512 + ReLU + dropout 0.5 -> fc7 512 + ReLU + dropout 0.5 -> fc8 n_classes (softmax in the loss)

Pooling rounds up as Caffe's does (ceil_mode), so 227-pixel input (its native size) gives
56 -> 28 -> 28 -> 14 -> 14 -> 7, and with 2 classes the network has exactly 11,411,970 parameters
(conv1 14,208). LRN is Caffe's across-channel form: x / (1 + alpha / 5 * sum of 5 squares) ^ beta.
After the Caffe pool3, an adaptive max-pool to 7 x 7 lets other input sizes reach fc6 unchanged: it
is the identity at 227 px (so the network there is exactly GenderNet), and at 64 px, where pool3
leaves 1 x 1 x 384, it copies that vector to all 49 positions (fc6 then acts as a 384 -> 512 layer
whose weights are the sums over positions); inputs under 35 px are too small for pool3.
The authors' face-gender weights are not available offline, so it trains from scratch only
(model.init "gaussian", as their prototxt, or "xavier").
`drop_rate` > 0 replaces the 0.5 dropout after fc6 and fc7.
"""

from __future__ import annotations

import torch
from torch import nn

from cellmorph.models.backbone import LinearHead

INPUT_SIZE = 227


class GenderNet(LinearHead, nn.Module):
    num_features = 512  # the width of the pooled features the classifier reads (the Backbone contract)
    HEAD, HEAD_DROP = "fc8", "drop7"  # LinearHead: the classifier and the dropout before it

    def __init__(self, num_classes: int = 2, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        drop = drop_rate if drop_rate > 0 else 0.5
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, 7, stride=4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
            nn.Conv2d(96, 256, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.AdaptiveMaxPool2d(7),
            nn.Flatten(),
        )
        self.fc6 = nn.Linear(7 * 7 * 384, 512)
        self.drop6 = nn.Dropout(drop)
        self.fc7 = nn.Linear(512, 512)
        self.drop7 = nn.Dropout(drop)
        self.fc8 = nn.Linear(512, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc7(self.drop6(torch.relu(self.fc6(self.features(x))))))
