"""Outputs against reference outputs: onnxruntime against the Python side (torch + scikit-learn + policy) on
held-out inputs, or a reloaded bundle against its recorded golden outputs.

Each value output has a tolerance: RELATIVE_TOLERANCE x max(1, max |ref|) (the max over the output's finite
reference values), or, when larger, ROUNDING_FACTOR x how far the output moves when the classifier runs in
float64 instead of float32 (:meth:`HardenedModel.run`), i.e. what float32 rounding over the model's depth does
to it.  float32 sums round at the scale of the values summed, not of each result, so a logit near 0 beside
logits of 10 carries an error of 10's order, and a detector that standardises a feature of small spread
magnifies it; onnxruntime sums in other orders than torch, within a few times torch's own rounding.  Alarms are
compared exactly, except where the reference score lies within its own tolerance of the threshold (a float tie).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harden.errors import HardenError

RELATIVE_TOLERANCE = 1e-4
ROUNDING_FACTOR = 4.0


@dataclass
class ParityReport:
    samples: int
    abs_diff: dict[str, float]    # per value output: max |onnxruntime - reference|
    alarm_mismatches: dict[str, int]
    threshold_ties: dict[str, int]
    tolerance: dict[str, float]   # per value output: see the module docstring
    rounding: dict[str, float]    # per value output where measured: max |float32 - float64-classifier reference|

    def to_json(self) -> dict:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff, "abs_diff": self.abs_diff,
                "tolerance": self.tolerance,
                "float32_rounding": self.rounding, "relative_tolerance": RELATIVE_TOLERANCE,
                "rounding_factor": ROUNDING_FACTOR, "alarm_mismatches": self.alarm_mismatches,
                "threshold_ties": self.threshold_ties}

    @property
    def max_abs_diff(self) -> float:
        """The largest difference over every value output (``abs_diff`` has them one by one)."""
        return max(self.abs_diff.values(), default=0.0)

    def worst_ratio(self) -> float:
        """The largest difference as a fraction of its tolerance (<= 1 when parity holds)."""
        return max((self.abs_diff[k] / self.tolerance[k] for k in self.abs_diff), default=0.0)


def tolerance_of(ref: np.ndarray) -> float:
    """RELATIVE_TOLERANCE x max(1, the largest finite |ref|)."""
    finite = np.abs(ref[np.isfinite(ref)].astype(np.float64))
    return RELATIVE_TOLERANCE * max(1.0, float(finite.max()) if finite.size else 1.0)


def _value_diff(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    if np.any(np.isnan(ref) != np.isnan(got)) or np.any(np.isinf(ref) != np.isinf(got)):
        return float("inf")
    with np.errstate(invalid="ignore"):
        diff = np.abs(ref - got)
    diff[same_special] = 0.0
    return float(diff.max()) if diff.size else 0.0


def rounding_of(reference: dict[str, np.ndarray], float64: dict[str, np.ndarray] | None) -> dict[str, float]:
    """Per value output, max |reference - float64-classifier reference| over rows with a finite input."""
    if not float64:
        return {}
    rows = np.isfinite(reference["input"].reshape(len(reference["input"]), -1)).all(axis=1)
    out = {}
    for name, ref in reference.items():
        if name == "input" or name.endswith("alarm") or name not in float64:
            continue
        a, b = ref[rows].astype(np.float64), float64[name][rows].astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        out[name] = float(np.abs(a - b)[finite].max()) if finite.any() else 0.0
    return out


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str,
            rounding: dict[str, float] | None = None, score_tolerance: float | None = None) -> ParityReport:
    """Values within their tolerance, alarms identical but for float ties at the threshold.

    ``score_tolerance``: a wider floor for the scores' tolerance (``score``, ``<method>.score``), and the alarms
    may then also differ where the reference score lies within it of the threshold (a float32 graph of float64
    algebra: :mod:`harden.export.portable`)."""
    diffs, mismatches, ties, tolerances = {}, {}, {}, {}
    rounding = dict(rounding or {})
    score_floor = score_tolerance or 0.0
    problems = []
    # Values computed from NaN/inf inputs are backend-specific (a max pool may or may not keep a NaN);
    # for those rows only the verdict is compared: every alarm must be raised on both sides.
    rows = np.isfinite(reference["input"].reshape(len(reference["input"]), -1)).all(axis=1)
    for name, ref in reference.items():
        if name == "input":
            continue
        if name not in got:
            problems.append(f"output {name!r} is missing")
            continue
        value = got[name]
        if value.shape != ref.shape:
            problems.append(f"{name} has shape {value.shape}, expected {ref.shape}")
            continue
        if name == "alarm" or name.endswith(".alarm"):
            score_name = name[: -len("alarm")] + "score"
            score = reference[score_name]
            differ = value.astype(bool) != ref.astype(bool)
            tie_tolerance = max(_tolerance(score[rows], rounding.get(score_name, 0.0)), score_floor)
            tie = differ & (np.abs(score) <= tie_tolerance)
            mismatches[name] = int((differ & ~tie).sum())
            ties[name] = int(tie.sum())
            if mismatches[name]:
                problems.append(f"{name} differs on {mismatches[name]} of {len(ref)} inputs")
        else:
            diffs[name] = _value_diff(ref[rows], value[rows])
            tolerances[name] = _tolerance(ref[rows], rounding.get(name, 0.0))
            if name.endswith("score"):
                tolerances[name] = max(tolerances[name], score_floor)
            if diffs[name] > tolerances[name]:
                problems.append(f"{name} differs by {diffs[name]:.3g} (tolerance {tolerances[name]:.3g}: "
                                f"{RELATIVE_TOLERANCE:g} of its magnitude, or {ROUNDING_FACTOR:g} x its float32 "
                                f"rounding {rounding.get(name, 0.0):.3g}"
                                f"{f', or the float32 graph score floor {score_floor:g}' if score_floor and name.endswith('score') else ''})")
    if problems:
        raise HardenError(f"{what} parity failed: " + "; ".join(problems))
    samples = len(next(iter(reference.values())))
    return ParityReport(samples, diffs, mismatches, ties, tolerances, {k: rounding[k] for k in diffs if k in rounding})


def _tolerance(ref: np.ndarray, rounding: float) -> float:
    return max(tolerance_of(ref), ROUNDING_FACTOR * rounding)
