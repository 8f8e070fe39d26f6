"""A two-layer network for 1x28x28 inputs, the thesis's certified-defence model (001, section 4.2).

Use it as ``--arch harden.examples.two_layer:TwoLayerMLP`` (hidden width 100); train it with
``python -m harden.examples.train_lenet --model two-layer --out out/two_layer_mnist.pt``.
``harden certify --bounds sdp`` certifies exactly this shape: (flatten ->) linear -> relu -> linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TwoLayerMLP(nn.Module):
    """flatten - fc 784-100 - ReLU - fc 100-10."""

    def __init__(self, num_classes: int = 10, hidden: int = 100, inputs: int = 28 * 28):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(inputs, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))
