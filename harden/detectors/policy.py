"""The alarm policy: per-method scores centred on their thresholds, combined as 'at least k of M'.

Every exported score is ``(raw - threshold) / scale``, so a method alarms
exactly when its score is above 0, and the combined score is the k-th largest
method score (``any`` = 1st, ``majority`` = the floor(M/2)+1-th).  An alarm is
``not (score <= 0)``, so a NaN score alarms too, and a row with a non-finite
input value alarms whatever the scores say.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from harden.errors import HardenError


def policy_k(policy: str, n_methods: int) -> int:
    """How many methods must alarm for the combined alarm, from ``any | majority | k:N``."""
    text = policy.strip().lower()
    if text == "any":
        return 1
    if text == "majority":
        return n_methods // 2 + 1
    if text.startswith("k:"):
        try:
            k = int(text[2:])
        except ValueError:
            raise HardenError(f"--policy {policy!r}: k:N needs a whole number N") from None
        if not 1 <= k <= n_methods:
            raise HardenError(f"--policy {policy!r}: N must lie between 1 and the number of methods ({n_methods})")
        return k
    raise HardenError(f"--policy {policy!r} is not one of any, majority, k:N")


class AlarmPolicy(nn.Module):
    def __init__(self, thresholds: list[float], scales: list[float], k: int):
        super().__init__()
        self.k = int(k)
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))

    def forward(self, input_finite: torch.Tensor, *raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (score, alarm, score_1, alarm_1, ..., score_M, alarm_M)."""
        stacked = torch.stack([r.float() for r in raw], dim=1)
        scores = (stacked - self.thresholds) / self.scales
        bad_input = torch.logical_not(input_finite).unsqueeze(1)
        scores = torch.where(bad_input, float("inf"), scores)   # a scalar: no Shape and Expand in the graph
        alarms = torch.logical_not(scores <= 0)
        if self.k == 1:   # "any": a max, not a TopK (which float16 converters leave in float32)
            combined = scores.amax(dim=1)
        else:
            combined = torch.topk(scores, self.k, dim=1).values[:, self.k - 1]
        # "the k-th largest score is not <= 0" is "at least k methods alarm" (a NaN score alarms in both); counted
        # from the per-method alarms, so that no node reads the ``score`` output (float16 converters keep a graph
        # output in float32 and then mistype the nodes that read it).
        combined_alarm = alarms.sum(dim=1) >= self.k
        outputs: list[torch.Tensor] = [combined, combined_alarm]
        for j in range(stacked.shape[1]):
            outputs += [scores[:, j], alarms[:, j]]
        return tuple(outputs)


class FiniteRows(nn.Module):
    """True for each row whose every value is finite: x - x is 0 for a finite x and NaN for NaN and +-inf, and a
    sum of zeros is 0 while one NaN makes it NaN.

    Exported as Sub, ReduceSum and Equal: two passes over the input where |x| <= the largest float took four
    (Abs, LessOrEqual, Cast, ReduceMin: a quarter of a millisecond per batch of 64 CIFAR-sized images, which is
    most of ctt-lite's latency budget on a ResNet-18).  No IsInf / IsNaN (IsInf has no float16 kernel before
    opset 20 and converters to edge runtimes trip on it); a float16 conversion keeps it exact (a sum of zeros
    cannot overflow, unlike a sum of the values), and no int8 quantiser rewrites a Sub or an Equal.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.eq((x - x).flatten(1).sum(dim=1), 0)
