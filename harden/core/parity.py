"""Outputs against reference outputs (onnxruntime or a reloaded bundle against the recorded golden outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harden.errors import HardenError

VALUE_TOLERANCE = 1e-4
TIE_TOLERANCE = 1e-5  # an alarm may differ only where the reference score is this close to its threshold


@dataclass
class ParityReport:
    samples: int
    max_abs_diff: dict[str, float]
    alarm_mismatches: dict[str, int]
    threshold_ties: dict[str, int]

    def to_json(self) -> dict:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff,
                "alarm_mismatches": self.alarm_mismatches, "threshold_ties": self.threshold_ties}


def _value_diff(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    if np.any(np.isnan(ref) != np.isnan(got)) or np.any(np.isinf(ref) != np.isinf(got)):
        return float("inf")
    with np.errstate(invalid="ignore"):
        diff = np.abs(ref - got) / np.maximum(1.0, np.abs(ref))
    diff[same_special] = 0.0
    return float(diff.max()) if diff.size else 0.0


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> ParityReport:
    """Values within 1e-4 (relative above 1), alarms identical but for float ties at the threshold."""
    diffs, mismatches, ties = {}, {}, {}
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
            score = reference[name[: -len("alarm")] + "score"]
            differ = value.astype(bool) != ref.astype(bool)
            tie = differ & (np.abs(score) <= TIE_TOLERANCE)
            mismatches[name] = int((differ & ~tie).sum())
            ties[name] = int(tie.sum())
            if mismatches[name]:
                problems.append(f"{name} differs on {mismatches[name]} of {len(ref)} inputs")
        else:
            diffs[name] = _value_diff(ref[rows], value[rows])
            if diffs[name] > VALUE_TOLERANCE:
                problems.append(f"{name} differs by {diffs[name]:.3g} (tolerance {VALUE_TOLERANCE})")
    if problems:
        raise HardenError(f"{what} parity failed: " + "; ".join(problems))
    samples = len(next(iter(reference.values())))
    return ParityReport(samples, diffs, mismatches, ties)
