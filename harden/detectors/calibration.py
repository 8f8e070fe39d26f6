"""Thresholds set on the held-out calibration split to a target false-positive rate.

Every method's raw score means "higher is more suspicious".  A threshold is
placed halfway between two neighbouring distinct calibration scores, so no
calibration sample sits exactly on it and float rounding in onnxruntime
cannot flip a verdict there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harden.errors import HardenError


def threshold_for_count(scores: np.ndarray, allowed: int) -> float:
    """The threshold t with at most ``allowed`` scores strictly above it, as low as possible."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        raise HardenError("calibration scores are all non-finite; the detector cannot be calibrated")
    allowed = int(min(max(allowed, 0), len(s) - 1))
    v = s[allowed]
    if not np.isfinite(v):
        v = finite[0]
    above = s[s > v]
    above = above[np.isfinite(above)]
    upper = above.min() if above.size else v + max(1e-3, abs(v) * 1e-3)
    return float((v + upper) / 2.0)


def scale_of(scores: np.ndarray) -> float:
    """A robust spread (interquartile range, else std, else 1) that puts scores of methods on one scale."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return 1.0
    q75, q25 = np.percentile(s, [75, 25])
    spread = q75 - q25
    if spread <= 1e-12:
        spread = float(s.std())
    if spread <= 1e-12:
        spread = float(np.abs(s).max())
    return float(spread) if spread > 1e-12 else 1.0


@dataclass(frozen=True)
class Calibration:
    thresholds: list[float]
    scales: list[float]
    k: int
    achieved_fpr: float
    per_method_fpr: list[float]


def kth_largest_alarm(normalised: np.ndarray, k: int) -> np.ndarray:
    """alarm when at least k methods' normalised scores are above 0."""
    return (normalised > 0).sum(axis=1) >= k


def calibrate(raw: np.ndarray, k: int, fpr: float) -> Calibration:
    """Per-method thresholds at one common level, the highest whose combined alarm keeps FPR <= fpr.

    ``raw`` is [N, M]: calibration-split raw scores of M methods.
    """
    if not 0.0 <= fpr < 1.0:
        raise HardenError(f"--fpr must lie in [0, 1); got {fpr}")
    n, m = raw.shape
    if n < 2:
        raise HardenError("the calibration split needs at least 2 samples")
    if not 1 <= k <= m:
        raise HardenError(f"the alarm policy needs {k} of {m} methods; choose k between 1 and {m}")

    def at_level(count: int) -> tuple[list[float], float]:
        thresholds = [threshold_for_count(raw[:, j], count) for j in range(m)]
        alarms = kth_largest_alarm(raw - np.asarray(thresholds)[None, :], k)
        return thresholds, float(alarms.mean())

    lo, hi = 0, n - 1  # per-method allowed false positives; combined FPR grows with it
    best, _ = at_level(0)
    while lo <= hi:
        mid = (lo + hi) // 2
        thresholds, achieved = at_level(mid)
        if achieved <= fpr:
            best, lo = thresholds, mid + 1
        else:
            hi = mid - 1
    normalised = raw - np.asarray(best)[None, :]
    return Calibration(
        thresholds=best,
        scales=[scale_of(raw[:, j]) for j in range(m)],
        k=k,
        achieved_fpr=float(kth_largest_alarm(normalised, k).mean()),
        per_method_fpr=[float((normalised[:, j] > 0).mean()) for j in range(m)],
    )
