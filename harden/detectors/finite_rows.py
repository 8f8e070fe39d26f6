"""Scoring with scikit-learn, which refuses NaN: the rows with a non-finite feature score NaN, which alarms
(harden.detectors.policy), as the exported graph's algebra has it without a test of its own."""

from __future__ import annotations

from typing import Callable

import numpy as np


def score_finite_rows(features: np.ndarray, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``score`` on the rows whose features are all finite; NaN for the others."""
    features = np.asarray(features, dtype=np.float32)
    out = np.full(len(features), np.nan, dtype=np.float32)
    finite = np.isfinite(features).all(axis=1)
    if finite.any():
        out[finite] = score(features[finite])
    return out
