"""bench/suite: every pair builds, trains deterministically at small size, and differs where the issue asks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.suite.pairs import PAIRS, load_pair
from bench.suite.shapes import CLASSES, make_shapes


def test_shapes_are_deterministic_balanced_and_in_range():
    x1, y1 = make_shapes(200, seed=3)
    x2, y2 = make_shapes(200, seed=3)
    assert x1.dtype == np.uint8 and x1.shape == (200, 3, 32, 32)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.bincount(y1, minlength=len(CLASSES)).tolist() == [20] * len(CLASSES)
    x3, _ = make_shapes(200, seed=4)
    assert not np.array_equal(x1, x3)


def test_pairs_cover_sizes_shapes_and_architectures():
    shapes, archs, sizes = set(), set(), []
    for name in PAIRS:
        lp_data = __import__("bench.suite.pairs", fromlist=["load_pair_data"]).load_pair_data(PAIRS[name])
        shapes.add(tuple(lp_data.input_shape))
        archs.add(PAIRS[name].arch)
        sizes.append(len(lp_data.train))
    assert {(1, 8, 8), (1, 28, 28), (3, 32, 32)} <= shapes
    assert archs == {"lenet5", "cnn", "mlp", "resnet", "mobilenet", "vgg", "resnet18"}
    assert min(sizes) <= 900 and max(sizes) >= 3900


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_trains_deterministically_at_small_size(name, one_thread):
    a = load_pair(name, small=True)
    b = load_pair(name, small=True)
    assert len(a.data.train) + len(a.data.calibration) + len(a.data.test) == 300
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{name}: {ka} differs between two seeded runs"
    assert not a.model.training
    with torch.no_grad():
        logits = a.model(a.data.test.x[:4])
    assert logits.shape == (4, a.data.num_classes) and torch.isfinite(logits).all()
