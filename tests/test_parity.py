"""Export parity's tolerances: relative to each output's magnitude, or a few times what float32 rounding in the
classifier does to the output (the classifier run in float64), whichever is larger; stated in the report."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from harden.core.parity import RELATIVE_TOLERANCE, ROUNDING_FACTOR, compare, rounding_of
from harden.errors import HardenError
from harden.export import export_onnx
from harden.methods.base import Options

from conftest import train_tiny


def _outputs(logits: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    return {"input": np.zeros((len(score), 1, 2, 2), np.float32), "logits": logits.astype(np.float32),
            "score": score.astype(np.float32), "alarm": score > 0}


def test_tolerance_is_relative_to_the_largest_magnitude_not_to_each_value():
    ref = _outputs(np.array([[260.0, 0.01]]), np.array([-1.0]))
    got = _outputs(np.array([[260.0, 0.01 + 0.02]]), np.array([-1.0]))   # a value near 0 beside one of 260
    report = compare(ref, got, "test")
    assert report.tolerance["logits"] == pytest.approx(RELATIVE_TOLERANCE * 260.0)
    got["logits"][0, 1] = 0.01 + 0.03
    with pytest.raises(HardenError, match=r"logits differs by 0\.03 \(tolerance 0\.026"):
        compare(ref, got, "test")


def test_float32_rounding_widens_a_tolerance_and_is_reported():
    ref = _outputs(np.array([[1.0, 2.0]]), np.array([0.5]))
    float64 = _outputs(np.array([[1.0, 2.0]]), np.array([0.5 + 0.01]))       # the score moves by 0.01 in float64
    rounding = rounding_of(ref, float64)
    assert rounding == {"logits": 0.0, "score": pytest.approx(0.01, rel=1e-5)}
    got = _outputs(np.array([[1.0, 2.0]]), np.array([0.5 + 0.03]))
    report = compare(ref, got, "test", rounding)
    assert report.tolerance["score"] == pytest.approx(ROUNDING_FACTOR * 0.01, rel=1e-5)
    got["score"][0] = 0.5 + 0.05
    with pytest.raises(HardenError, match="float32 rounding"):
        compare(ref, got, "test", rounding)


def test_an_alarm_may_differ_only_at_a_float_tie():
    ref = _outputs(np.array([[1.0, 2.0]] * 2), np.array([1e-5, 0.5]))
    got = {**ref, "alarm": ~ref["alarm"]}
    with pytest.raises(HardenError, match="alarm differs on 1 of 2"):
        compare(ref, got, "test")
    got["alarm"][1] = ref["alarm"][1]
    assert compare(ref, got, "test").threshold_ties["alarm"] == 1


class Deep(nn.Module):
    """Forty residual layers: running it in float64 moves its logits (by ~4e-6), so the rounding is measured."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(40))
        self.inp, self.out = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return self.out(h)


def test_export_reports_plain_float_figures_with_the_rounding_it_measured(digits, one_thread):
    import harden

    torch.manual_seed(0)
    model = train_tiny(Deep(), digits.train.x[:300], digits.train.y[:300], epochs=1)
    hardened = harden.instrument(model, digits, ["ctt-lite"], Options(key="parity", fpr=0.1, fpr_confidence=0))
    report = export_onnx(hardened).parity
    doc = report.to_json()
    json.dumps(doc, allow_nan=False)
    for field in ("abs_diff", "tolerance", "float32_rounding"):
        assert all(type(v) is float for v in doc[field].values()), (field, doc[field])
    assert type(report.max_abs_diff) is float and report.max_abs_diff == max(report.abs_diff.values())
    assert doc["max_abs_diff"] == report.max_abs_diff
    assert doc["float32_rounding"]["logits"] > 0.0       # the float64 run moved the logits: it was measured
    assert report.worst_ratio() <= 1.0
    assert all(report.abs_diff[k] <= report.tolerance[k] for k in report.abs_diff)
