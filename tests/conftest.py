"""Shared fixtures: tiny seeded models built and trained in code on scikit-learn's 8x8 digits (no checkpoints)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import settings as _hypothesis_settings

torch.set_num_threads(2)

# CI must give the same verdict on every run: property tests draw a fixed (derandomized) set of examples there.
# HARDEN_HYPOTHESIS_PROFILE=explore draws fresh examples each run, to hunt for new counterexamples.
_hypothesis_settings.register_profile("ci", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HARDEN_HYPOTHESIS_PROFILE", "ci"))


class TinyCNN(nn.Module):
    """Mixes spellings on purpose: nn.ReLU, F.relu, Tensor.view with size()."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


def train_tiny(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0,
               lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def digits_arrays() -> tuple:
    """scikit-learn's 8x8 digits as float32 NCHW in [0, 1] and int64 labels, unsplit."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two OpenMP threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    from harden.io.data import load_data

    return load_data("digits", seed=0)


@pytest.fixture(scope="session")
def tiny_model(digits):
    torch.manual_seed(0)
    return train_tiny(TinyCNN(), digits.train.x, digits.train.y)


@pytest.fixture(scope="session")
def tiny_hardened(tiny_model, digits):
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import Options

    return instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05"], Options(key="test-key"))
