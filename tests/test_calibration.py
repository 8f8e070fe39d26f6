import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from harden.detectors.calibration import calibrate, kth_largest_alarm, needed_samples, threshold_for_count
from harden.errors import HardenError
from harden.detectors.policy import AlarmPolicy, policy_k


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
    """--fpr-confidence 0: the empirical rule, as close to the target on the calibration split as it allows."""
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(1000, 1))
    cal = calibrate(raw, 1, fpr, fpr_confidence=0)
    assert cal.achieved_fpr <= fpr
    assert cal.achieved_fpr >= fpr - 0.002  # as close as 1000 samples allow
    assert (raw[:, 0] > cal.thresholds[0]).mean() == pytest.approx(cal.achieved_fpr)


@pytest.mark.parametrize("fpr, confidence", [(0.01, 0.9), (0.02, 0.9), (0.1, 0.9), (0.05, 0.5), (0.05, 0.99)])
def test_single_method_allows_the_largest_count_the_binomial_bound_permits(fpr, confidence):
    rng = np.random.default_rng(0)
    n = 1000
    raw = rng.normal(size=(n, 1))
    cal = calibrate(raw, 1, fpr, fpr_confidence=confidence)
    c, delta = cal.allowed_alarms, 1 - confidence
    assert binom.cdf(c, n, fpr) <= delta < binom.cdf(c + 1, n, fpr)
    assert c < n * fpr or confidence <= 0.5   # a real promise costs alarms on the calibration split
    assert (raw[:, 0] > cal.thresholds[0]).sum() == cal.alarms == c   # continuous scores: exactly c
    assert cal.achieved_fpr == c / n and cal.confidence == confidence and cal.samples == n
    # the Clopper-Pearson bound: the FPR at which seeing <= c alarms has probability exactly delta, and <= the target
    assert binom.cdf(c, n, cal.fpr_upper_bound) == pytest.approx(delta, rel=1e-6)
    assert cal.fpr_upper_bound <= fpr


@pytest.mark.parametrize("k", [1, 2, 3])
def test_combined_calibration_under_k_of_m(k):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(2000, 3))
    cal = calibrate(raw, k, 0.05, fpr_confidence=0)
    alarms = ((raw - np.array(cal.thresholds)) > 0).sum(1) >= k
    assert alarms.mean() == pytest.approx(cal.achieved_fpr)
    assert 0.04 <= cal.achieved_fpr <= 0.05
    # the order-statistic rule: at most c combined alarms, and one level more would exceed c (a level admits
    # one more score per method, so it adds at most 3 combined alarms)
    cal = calibrate(raw, k, 0.05)
    alarms = ((raw - np.array(cal.thresholds)) > 0).sum(1) >= k
    assert alarms.sum() == cal.alarms
    assert cal.allowed_alarms - 2 <= cal.alarms <= cal.allowed_alarms
    assert binom.cdf(cal.allowed_alarms, 2000, 0.05) <= 0.1 < binom.cdf(cal.allowed_alarms + 1, 2000, 0.05)


def _test_fprs(n, fpr, confidence, m, k, seeds, rng, test_size=20_000, correlation=0.5):
    """The test FPR of ``seeds`` independent calibrations, each on n fresh draws of correlated Gaussian scores."""
    def draw(size):
        shared = rng.normal(size=(size, 1))
        return math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * rng.normal(size=(size, m))

    out = np.empty(seeds)
    for s in range(seeds):
        cal = calibrate(draw(n), k, fpr, fpr_confidence=confidence)
        out[s] = kth_largest_alarm(draw(test_size) - np.asarray(cal.thresholds)[None, :], k).mean()
    return out


@pytest.mark.parametrize("n, fpr, confidence, m, k", [
    (1000, 0.05, 0.9, 1, 1),
    (400, 0.1, 0.8, 1, 1),
    (500, 0.05, 0.9, 3, 1),    # any of 3
    (300, 0.1, 0.8, 3, 2),     # majority of 3
])
def test_the_promise_holds_on_new_data(n, fpr, confidence, m, k):
    """Over many calibration splits, the test FPR exceeds --fpr in at most a 1 - confidence share of them."""
    seeds, delta = 400, 1 - confidence
    test_fpr = _test_fprs(n, fpr, confidence, m, k, seeds, np.random.default_rng(2024 + n + m + k))
    # the share of seeds over the target is Binomial(seeds, p <= delta) / seeds: allow its 0.999 quantile
    allowance = binom.ppf(0.999, seeds, delta) / seeds
    assert (test_fpr > fpr).mean() <= allowance
    assert test_fpr.mean() > fpr / 3   # not vacuous: a detector that never alarms would pass the line above


def test_the_empirical_rule_breaks_the_promise():
    """Why the rule exists: the plain empirical quantile overshoots the target on about half the splits."""
    test_fpr = _test_fprs(300, 0.05, 0.0, 1, 1, 400, np.random.default_rng(5))
    assert (test_fpr > 0.05).mean() > binom.ppf(0.999, 400, 0.1) / 400


@pytest.mark.parametrize("fpr, confidence", [(0.02, 0.9), (0.05, 0.9), (0.1, 0.95), (0.01, 0.5)])
def test_a_split_too_small_for_the_promise_is_an_error_naming_the_size_needed(fpr, confidence):
    needed = needed_samples(fpr, confidence)
    assert needed == max(2, math.ceil(math.log(1 - confidence) / math.log(1 - fpr)))
    rng = np.random.default_rng(3)
    with pytest.raises(HardenError, match=rf"{needed - 1} inputs.*at least {needed} inputs.*--fpr-confidence"):
        calibrate(rng.normal(size=(needed - 1, 2)), 1, fpr, fpr_confidence=confidence)
    raw = rng.normal(size=(needed, 2))
    cal = calibrate(raw, 1, fpr, fpr_confidence=confidence)
    assert cal.allowed_alarms == 0 and cal.alarms == 0 and cal.needed_samples == needed
    assert (raw > np.asarray(cal.thresholds)).sum() == 0
    assert cal.fpr_upper_bound <= fpr


def test_needed_samples_at_the_documented_example():
    assert needed_samples(0.02, 0.9) == 114
    assert needed_samples(0.5, 0.75) == 2    # 0.5^2 == 0.25 exactly: on the boundary counts
    assert needed_samples(0.02, 0.0) == 2
    assert needed_samples(0.0, 0.9) is None


def test_fpr_zero_needs_no_minimum_split_and_reports_what_the_split_proves():
    raw = np.random.default_rng(4).normal(size=(50, 2))
    cal = calibrate(raw, 1, 0.0)
    assert cal.allowed_alarms == 0 and cal.alarms == 0 and cal.needed_samples is None
    assert (raw > np.asarray(cal.thresholds)).sum() == 0
    assert cal.fpr_upper_bound == pytest.approx(1 - 0.1 ** (1 / 50))


def test_confidence_outside_zero_one_is_an_error():
    raw = np.zeros((200, 1))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(HardenError, match="--fpr-confidence"):
            calibrate(raw, 1, 0.05, fpr_confidence=bad)


def _old_calibrate(raw, k, fpr):
    """The empirical rule exactly as harden had it before the order-statistic rule."""
    n, m = raw.shape

    def at_level(count):
        thresholds = [threshold_for_count(raw[:, j], count) for j in range(m)]
        return thresholds, float(kth_largest_alarm(raw - np.asarray(thresholds)[None, :], k).mean())

    lo, hi = 0, n - 1
    best, _ = at_level(0)
    while lo <= hi:
        mid = (lo + hi) // 2
        thresholds, achieved = at_level(mid)
        if achieved <= fpr:
            best, lo = thresholds, mid + 1
        else:
            hi = mid - 1
    return best


@pytest.mark.parametrize("n, m, k, fpr", [(1000, 1, 1, 0.02), (37, 1, 1, 0.1), (500, 3, 1, 0.05), (500, 3, 2, 0.05),
                                          (333, 4, 4, 0.07), (200, 2, 1, 0.0), (10, 2, 2, 0.3), (1000, 1, 1, 0.013)])
def test_confidence_zero_is_the_old_empirical_rule(n, m, k, fpr):
    rng = np.random.default_rng(n + m + k)
    for raw in (rng.normal(size=(n, m)), rng.integers(0, 5, size=(n, m)).astype(float)):   # also with ties
        cal = calibrate(raw, k, fpr, fpr_confidence=0)
        assert cal.thresholds == _old_calibrate(raw, k, fpr)
        assert cal.fpr_upper_bound is None and cal.confidence == 0


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
