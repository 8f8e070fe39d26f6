"""Instrumentation keeps logits bit-identical, ctt-lite profiles thresholds, calibration reaches the FPR."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from harden.errors import HardenError
from harden.graph.trace import trace
from harden.instrumentation.pipeline import instrument
from harden.methods.base import Options, select_sites
from harden.methods.ctt import TrapHead, make_masks


def test_instrumented_logits_are_bit_identical(tiny_model, tiny_hardened, digits):
    x = digits.test.x
    with torch.no_grad():
        expected = tiny_model(x)
        logits, finite, raw = tiny_hardened.graph(x)
    assert torch.equal(logits, expected)
    assert finite.all()
    assert raw.shape == (len(x),)


def test_masks_are_keyed_and_keep_one_neuron_per_site():
    sizes = {"a": 1000, "b": 10}
    m1 = make_masks("k1", sizes, 0.01)
    assert len(m1["a"]) == 10 and len(m1["b"]) == 1
    assert torch.equal(m1["a"], make_masks("k1", sizes, 0.01)["a"])
    assert not torch.equal(m1["a"], make_masks("k2", sizes, 0.01)["a"])
    assert torch.all(m1["a"][1:] > m1["a"][:-1])


def test_ctt_lite_thresholds_are_the_natural_upper_bound(tiny_hardened, digits):
    method = tiny_hardened.methods[0]
    head: TrapHead = method.head
    from harden.graph.analyse import collect

    acts = collect(tiny_hardened.classifier, method.sites, digits.train.x, lambda s, a: a)
    for i, site in enumerate(method.sites):
        indices, thresholds = head.trap(i)
        assert torch.allclose(acts[site][:, indices].amax(0), thresholds)
    # so no training input exceeds any threshold: the raw score is <= 0 on the whole training split
    raw = tiny_hardened.torch_outputs(digits.train.x)["ctt-lite.raw"]
    assert raw.max() <= 0


def test_trap_head_is_a_gather_matching_a_masked_check():
    head = TrapHead([12], [3])
    head.indices_0.copy_(torch.tensor([1, 5, 7]))
    head.thresholds_0.copy_(torch.tensor([0.5, 0.5, 2.0]))
    act = torch.zeros(2, 3, 2, 2)
    act.view(2, -1)[0, 7] = 2.5
    act.view(2, -1)[1, 2] = 9.0  # not a trap
    raw = head(act)
    assert raw.tolist() == [0.5, -0.5]


def test_calibrated_fpr_and_reported_metrics(tiny_hardened, digits):
    metrics = tiny_hardened.facts["metrics"]
    assert metrics["calibration_fpr"] <= 0.02
    assert 0.0 <= metrics["test_fpr"] <= 0.2
    assert metrics["test_accuracy"] == metrics["original_test_accuracy"] > 0.8
    # the order-statistic rule's figures: n, c, the split it needs, and the bound the achieved count proves
    cal = metrics["calibration"]
    n = len(digits.calibration)
    assert cal["samples"] == n == metrics["calibration_samples"]
    assert tiny_hardened.facts["fpr_confidence"] == cal["confidence"] == 0.9
    assert cal["needed_samples"] == 114
    assert cal["alarms"] == round(metrics["calibration_fpr"] * n) <= cal["allowed_alarms"] < 0.02 * n
    assert metrics["calibration_fpr"] <= cal["fpr_upper_bound"] <= 0.02


def test_calibration_hits_the_requested_fpr_on_the_calibration_split(tiny_model, digits):
    n = len(digits.calibration)
    for fpr in (0.05, 0.1):
        for confidence in (0.0, 0.9):
            options = Options(key="k", fpr=fpr, fpr_confidence=confidence)
            hardened = instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05"], options)
            allowed = hardened.facts["metrics"]["calibration"]["allowed_alarms"]
            if confidence == 0:
                assert allowed == math.floor(fpr * n)
            else:
                assert binom.cdf(allowed, n, fpr) <= 1 - confidence < binom.cdf(allowed + 1, n, fpr)
            out = hardened.run(digits.calibration.x)
            assert out["alarm"].sum() <= allowed
            # and it is the highest level the calibration scores allow: one step lower would exceed the allowed count
            raw = hardened.raw_scores(hardened.torch_outputs(digits.calibration.x))[:, 0]
            threshold = hardened.policy.thresholds[0].item()
            next_lower = raw[raw <= threshold].max()
            assert (raw >= next_lower).sum() > allowed
            if confidence == 0:   # the empirical rule: the calibration FPR as close to the target as the split allows
                assert out["alarm"].mean() <= fpr < (raw >= next_lower).mean()


def test_a_calibration_split_too_small_for_the_promise_fails_before_fitting(tiny_model, digits, monkeypatch):
    from harden.methods.base import METHODS

    def never(self, ctx):
        raise AssertionError("fitted although calibration could never succeed")

    monkeypatch.setattr(METHODS.get("ctt-lite"), "fit", never)
    n = len(digits.calibration)
    with pytest.raises(HardenError, match=rf"has {n} inputs.*FPR <= 0.001 with confidence 0.9.*at least 2302 inputs"):
        instrument(tiny_model, digits, ["ctt-lite"], Options(key="k", fpr=0.001))


def test_non_finite_inputs_raise_the_alarm(tiny_hardened, digits):
    x = digits.test.x[:3].clone()
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    out = tiny_hardened.run(x)
    assert out["alarm"][:2].all()
    assert out["ctt-lite.alarm"][:2].all()


def test_layer_selection():
    names = ["relu1", "relu", "relu_1"]
    paths = {"relu1": "relu1", "relu": "relu", "relu_1": "relu_1"}
    assert select_sites(names, paths, "all") == names
    assert select_sites(names, paths, "last:2") == ["relu", "relu_1"]
    assert select_sites(names, paths, "relu_1,relu1") == ["relu_1", "relu1"]
    assert select_sites(names, paths, "deepest:2") == ["relu", "relu_1"]
    assert select_sites(names, paths, "deepest:8") == names   # fewer sites than K: every one
    for bad in ("last:0", "last:x", "last:4", "deepest:0", "deepest:x", "fc1", ""):
        with pytest.raises(HardenError):
            select_sites(names, paths, bad or ",")


def test_unknown_method_lists_supported(tiny_model, digits):
    with pytest.raises(HardenError, match="supported: .*ctt-lite"):
        instrument(tiny_model, digits, ["magic"])


def test_wrong_input_shape_is_one_clear_error(digits):
    from harden.examples.lenet import LeNet5

    with pytest.raises(HardenError, match="input shape"):
        instrument(LeNet5(), digits, ["ctt-lite"])
