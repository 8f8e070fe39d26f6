"""A two-input classifier and its data: a box around an input is a rectangle, so it can be sampled densely."""

from __future__ import annotations

import torch
import torch.nn as nn


class TwoInputToy(nn.Module):
    """Two inputs (a 1x1x2 'image'), so a box can be sampled densely."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2, 16)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


def two_input_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes cut by two thresholds on the two inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, 2, generator=generator)
    y = ((x[:, 0, 0, 0] > 0.5).long() + (x[:, 0, 0, 1] > 0.6).long())
    return x, y


def trained_two_input_toy(seed: int = 0, n: int = 600) -> tuple[TwoInputToy, torch.Tensor, torch.Tensor]:
    """The toy after 300 Adam steps of cross-entropy on ``n`` inputs of :func:`two_input_data`; (model, x, y)."""
    torch.manual_seed(seed)
    x, y = two_input_data(n, seed)
    model = TwoInputToy()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y
