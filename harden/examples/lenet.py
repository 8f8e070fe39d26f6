"""LeNet-5 for 1x28x28 inputs, written with nn.Module layers so torch.fx traces it with readable names.

Use it as ``--arch harden.examples.lenet:LeNet5``: the class itself is the factory (``LeNet5()``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LeNet5(nn.Module):
    """conv(1->6, 5x5, pad 2)-ReLU-pool - conv(6->16, 5x5)-ReLU-pool - fc 400-120-84-10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
