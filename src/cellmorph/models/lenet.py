"""The course lab's LeNet-inspired CNN (pharmbio kensert_CNN_lab, Keras), in PyTorch.

    conv 5x5x16 'same' + ReLU -> max-pool 4 -> conv 5x5x32 'same' + ReLU -> max-pool 4 ->
    conv 5x5x64 'same' + ReLU -> max-pool 4 -> flatten (4 x 4 x 64 = 1,024) -> dense 1,024 + ReLU ->
    dense n_classes (softmax in the loss)

On 256 x 256 x 3 input with 6 classes it has exactly 1,121,062 parameters (first layer 1,216).
The third pooling is adaptive (to 4 x 4): identical to max-pool 4 on 256-pixel input, and it lets
the same network take other input sizes without changing its parameter count.
`drop_rate` > 0 adds dropout after the flatten and after the 1,024 dense layer (the lab's
"add dropout" variant).
"""

from __future__ import annotations

import torch
from torch import nn

from cellmorph.models.backbone import LinearHead

INPUT_SIZE = 256


class LeNet(LinearHead, nn.Module):
    HEAD, HEAD_DROP = "fc2", "drop2"
    num_features = 1024  # the width of the pooled features the classifier reads (the Backbone contract)

    def __init__(self, num_classes: int = 6, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 5, padding="same"),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(4),
            nn.Conv2d(16, 32, 5, padding="same"),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(4),
            nn.Conv2d(32, 64, 5, padding="same"),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(4),
            nn.Flatten(),
        )
        self.drop1 = nn.Dropout(drop_rate)
        self.fc1 = nn.Linear(4 * 4 * 64, 1024)
        self.drop2 = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(1024, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(self.drop1(self.features(x))))
