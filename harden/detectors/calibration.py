"""Thresholds set on the held-out calibration split to a target false-positive rate, with a stated confidence.

The rule.  With ``n`` clean calibration inputs, a target false-positive rate
``fpr`` and a confidence ``1 - delta`` (``fpr_confidence``, default 0.9), the
alarm may fire on at most ``c`` calibration inputs, where ``c`` is the largest
count with ``P(Binomial(n, fpr) <= c) <= delta``.  The per-method thresholds
are then set at one common level, the highest whose combined alarm fires on at
most ``c`` calibration inputs.

The guarantee.  If new clean inputs are exchangeable with the calibration
split (drawn from the same distribution; e.g. both are random draws from one
pool) and scores have no ties (ties only make it safer), a threshold that lets ``c`` of ``n``
calibration scores through has a true false-positive rate F with
``P(F > fpr) = P(Binomial(n, fpr) <= c)`` (F is Beta(c + 1, n - c)
distributed).  So, with probability at least ``1 - delta`` over the draw of the
calibration split, the alarm's false-positive rate on new data is at most
``fpr``.  This is exact for one method; for several methods combined
("any", "majority", "k:N") the per-method thresholds are fitted to the same
split, and the guarantee is approximate (tests/test_calibration.py measures its
coverage).  It says nothing about inputs from a different distribution.

The price.  A guarantee needs enough data: even ``c = 0`` (no calibration
input may alarm) only works when ``(1 - fpr)^n <= delta``, i.e. with at least
``ceil(log(delta) / log(1 - fpr))`` inputs (114 for fpr 0.02 at confidence
0.9).  A smaller split is an error, not a silent weaker promise.

Confidence 0 is the plain empirical quantile (the old behaviour): at most
``floor(n * fpr)`` calibration inputs may alarm, no promise about new data:
the test FPR then exceeds ``fpr`` for about half of all calibration splits.

``fpr = 0`` puts every threshold above every calibration score (``c = 0``)
whatever the confidence: no finite split can prove a false-positive rate of
exactly 0, so no split is too small; ``fpr_upper_bound`` still reports what
the split does prove.

Every method's raw score means "higher is more suspicious".  A threshold is
placed halfway between two neighbouring distinct calibration scores, so no
calibration sample sits exactly on it and float rounding in onnxruntime
cannot flip a verdict there (halfway is above the order statistic, so it only
lowers the true FPR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harden.errors import HardenError

DEFAULT_CONFIDENCE = 0.9


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
    samples: int = 0                     # n, the calibration inputs
    allowed_alarms: int = 0              # c: at most this many calibration inputs may alarm
    alarms: int = 0                      # how many do (<= c, fewer when ties or k-of-M leave no level in between)
    confidence: float = DEFAULT_CONFIDENCE
    needed_samples: int | None = None    # smallest n with c >= 0 at this fpr and confidence (None: fpr 0, none suffices)
    fpr_upper_bound: float | None = None  # one-sided Clopper-Pearson bound at ``confidence`` (None at confidence 0)

    def facts(self) -> dict:
        """The manifest's ``metrics["calibration"]``."""
        return {"samples": self.samples, "allowed_alarms": self.allowed_alarms, "alarms": self.alarms,
                "confidence": self.confidence, "needed_samples": self.needed_samples,
                "fpr_upper_bound": self.fpr_upper_bound}


def kth_largest_alarm(normalised: np.ndarray, k: int) -> np.ndarray:
    """alarm when at least k methods' normalised scores are above 0."""
    return (normalised > 0).sum(axis=1) >= k


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 <= confidence < 1.0:
        raise HardenError(f"--fpr-confidence must lie in [0, 1); got {confidence}")
    return confidence


def _bound_holds(count: int, n: int, fpr: float, delta: float) -> bool:
    """P(Binomial(n, fpr) <= count) <= delta: letting ``count`` of ``n`` alarm keeps P(true FPR > fpr) <= delta."""
    from scipy.stats import binom

    return bool(binom.cdf(count, n, fpr) <= delta)


def needed_samples(fpr: float, confidence: float) -> int | None:
    """The fewest calibration inputs with which any threshold (c = 0) proves FPR <= fpr at this confidence.

    The smallest n with ``(1 - fpr)^n <= 1 - confidence``; at least 2 (the calibrator's floor).
    None for ``fpr = 0`` (no n suffices); 2 at confidence 0 (no promise asked).
    """
    confidence = _check_confidence(confidence)
    if fpr <= 0.0:
        return None
    if confidence == 0.0:
        return 2
    delta = 1.0 - confidence
    n = max(1, math.ceil(math.log(delta) / math.log1p(-fpr)))
    # the closed form and scipy's cdf may disagree in the last bit at an exact boundary: agree with the test used
    while n > 1 and _bound_holds(0, n - 1, fpr, delta):
        n -= 1
    while not _bound_holds(0, n, fpr, delta):
        n += 1
    return max(2, n)


def allowed_alarms(n: int, fpr: float, confidence: float) -> int:
    """c: the most calibration inputs (of n) that may alarm; -1 when even 0 cannot keep the promise."""
    confidence = _check_confidence(confidence)
    if fpr <= 0.0:
        return 0
    if confidence == 0.0:
        c = int(math.floor(n * fpr))   # the empirical rule: c / n <= fpr, exactly as the float comparison says
        while c > 0 and c / n > fpr:
            c -= 1
        while (c + 1) / n <= fpr:
            c += 1
        return c
    from scipy.stats import binom

    delta = 1.0 - confidence
    cdf = binom.cdf(np.arange(n + 1), n, fpr)   # non-decreasing in the count
    return int(np.searchsorted(cdf, delta, side="right")) - 1


def check_split(n: int, fpr: float, confidence: float) -> int:
    """c for a split of ``n`` inputs, or a HardenError when the split is too small to keep the promise at all."""
    c = allowed_alarms(n, fpr, confidence)
    if c < 0:
        raise HardenError(
            f"the calibration split has {n} inputs, too few to promise FPR <= {fpr:g} with confidence {confidence:g}: "
            f"that needs at least {needed_samples(fpr, confidence)} inputs; use more data, a larger --fpr, "
            f"or a lower --fpr-confidence (0 = the plain empirical threshold, no promise)")
    return c


def fpr_upper_bound(alarms: int, n: int, confidence: float) -> float | None:
    """The one-sided Clopper-Pearson upper bound on the true FPR, at ``confidence``, of ``alarms`` of ``n``."""
    confidence = _check_confidence(confidence)
    if confidence == 0.0:
        return None
    if alarms >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, alarms + 1, n - alarms))


def calibrate(raw: np.ndarray, k: int, fpr: float, fpr_confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
    """Per-method thresholds at one common level, the highest whose combined alarm fires on <= c calibration inputs.

    ``raw`` is [N, M]: calibration-split raw scores of M methods.  c is :func:`allowed_alarms` (the
    order-statistic rule of the module docstring); ``fpr_confidence = 0`` is the empirical rule c/N <= fpr.
    """
    if not 0.0 <= fpr < 1.0:
        raise HardenError(f"--fpr must lie in [0, 1); got {fpr}")
    confidence = _check_confidence(fpr_confidence)
    n, m = raw.shape
    if n < 2:
        raise HardenError("the calibration split needs at least 2 samples")
    if not 1 <= k <= m:
        raise HardenError(f"the alarm policy needs {k} of {m} methods; choose k between 1 and {m}")
    c = check_split(n, fpr, confidence)
    needed = needed_samples(fpr, confidence)

    def at_level(count: int) -> tuple[list[float], int]:
        thresholds = [threshold_for_count(raw[:, j], count) for j in range(m)]
        alarms = kth_largest_alarm(raw - np.asarray(thresholds)[None, :], k)
        return thresholds, int(alarms.sum())

    lo, hi = 0, n - 1  # per-method allowed false positives; combined alarms grow with it
    best, _ = at_level(0)
    while lo <= hi:
        mid = (lo + hi) // 2
        thresholds, alarms = at_level(mid)
        if alarms <= c:
            best, lo = thresholds, mid + 1
        else:
            hi = mid - 1
    normalised = raw - np.asarray(best)[None, :]
    combined = kth_largest_alarm(normalised, k)
    return Calibration(
        thresholds=best,
        scales=[scale_of(raw[:, j]) for j in range(m)],
        k=k,
        achieved_fpr=float(combined.mean()),
        per_method_fpr=[float((normalised[:, j] > 0).mean()) for j in range(m)],
        samples=n,
        allowed_alarms=c,
        alarms=int(combined.sum()),
        confidence=confidence,
        needed_samples=needed,
        fpr_upper_bound=fpr_upper_bound(int(combined.sum()), n, confidence),
    )


def describe(calibration: dict | None, fpr: float) -> str | None:
    """One line on a manifest's ``metrics["calibration"]`` (None for bundles written before it existed)."""
    if not calibration:
        return None
    n, c, alarms = calibration["samples"], calibration["allowed_alarms"], calibration["alarms"]
    confidence, bound = calibration["confidence"], calibration.get("fpr_upper_bound")
    proven = f"true FPR <= {bound:.3g} with confidence {confidence:g}" if bound is not None else ""
    if confidence == 0:
        return (f"calibration: {n} inputs, at most {c} may alarm (empirical FPR <= {fpr:g}; --fpr-confidence 0: "
                f"no promise about new data); {alarms} do")
    if fpr <= 0:
        return f"calibration: {n} inputs, none may alarm (--fpr 0: no split proves FPR 0); {proven}"
    return (f"calibration: {n} inputs, at most {c} may alarm for FPR <= {fpr:g} with confidence {confidence:g} "
            f"(needs >= {calibration['needed_samples']} inputs); {alarms} do: {proven}")
