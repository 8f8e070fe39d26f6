import numpy as np
import pytest
import torch

from harden.detectors.calibration import calibrate, threshold_for_count
from harden.errors import HardenError
from harden.policy import AlarmPolicy, policy_k


def test_threshold_allows_exactly_the_count_and_sits_between_scores():
    scores = np.arange(100, dtype=float)
    t = threshold_for_count(scores, 2)
    assert (scores > t).sum() == 2
    assert 97 < t < 98


def test_threshold_with_ties_never_exceeds_the_count():
    scores = np.array([0.0] * 95 + [1.0] * 5)
    t = threshold_for_count(scores, 2)
    assert (scores > t).sum() == 0  # five tied at 1.0: admitting any admits five
    assert t >= 1.0


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.02, 0.1])
def test_single_method_calibration_reaches_target(fpr):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(1000, 1))
    cal = calibrate(raw, 1, fpr)
    assert cal.achieved_fpr <= fpr
    assert cal.achieved_fpr >= fpr - 0.002  # as close as 1000 samples allow
    assert (raw[:, 0] > cal.thresholds[0]).mean() == pytest.approx(cal.achieved_fpr)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_combined_calibration_under_k_of_m(k):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(2000, 3))
    cal = calibrate(raw, k, 0.05)
    alarms = ((raw - np.array(cal.thresholds)) > 0).sum(1) >= k
    assert alarms.mean() == pytest.approx(cal.achieved_fpr)
    assert 0.04 <= cal.achieved_fpr <= 0.05


def test_policy_text():
    assert policy_k("any", 3) == 1
    assert policy_k("majority", 3) == 2
    assert policy_k("majority", 4) == 3
    assert policy_k("k:2", 3) == 2
    for bad in ("k:0", "k:4", "k:x", "most"):
        with pytest.raises(HardenError):
            policy_k(bad, 3)


def test_policy_module_scores_alarms_and_non_finite_rows():
    policy = AlarmPolicy([1.0, 10.0], [2.0, 5.0], k=1)
    finite = torch.tensor([True, True, False, True])
    raw_a = torch.tensor([0.0, 3.0, 0.0, float("nan")])
    raw_b = torch.tensor([0.0, 0.0, 0.0, 0.0])
    score, alarm, sa, aa, sb, ab = policy(finite, raw_a, raw_b)
    assert sa[:2].tolist() == [-0.5, 1.0]
    assert sb[0].item() == -2.0
    assert alarm.tolist() == [False, True, True, True]  # row 2: non-finite input; row 3: NaN score
    assert aa.tolist() == [False, True, True, True]
    assert torch.isinf(score[2])


def test_majority_needs_enough_methods():
    policy = AlarmPolicy([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], k=2)
    finite = torch.ones(2, dtype=torch.bool)
    score, alarm, *_ = policy(finite, torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0]))
    assert alarm.tolist() == [True, False]
    assert score.tolist() == [1.0, -1.0]
