"""The abstain certificate's rows (Sheikholeslami, Lotfi and Kolter, ICLR 2021), shared by ``harden certify`` and
the ``abstain`` method's fine-tuning.

The classifier's last layer is linear, logits z = W h + b_W on its input h; the abstain score is one more row on
the same input, z_abs = w_a . h + b_a, and the exported alarm fires when z_abs + offset > max_k z_k (offset = -t,
t the calibrated threshold).  Per sample with label y and every class j, two linear functions of h:

- margin rows  z_y - z_j                 = (W_y - W_j) . h + (b_y - b_j)
- abstain rows z_abs + offset - z_j      = (w_a - W_j) . h + (b_a + offset - b_j)

**The certificate** (detect-or-robust): for every j != y, lower(z_y - z_j) > 0 OR lower(z_abs + offset - z_j) > 0
over the box.  Sound: a point of the box whose argmax is some j != y has z_j >= z_y, so the first bound cannot hold
for that j; the second then gives z_abs + offset > z_j = max_k z_k, which is the alarm (``(raw - t) / s > 0`` with
raw = z_abs - max_k z_k).  Ties: a point with z_j = z_y is counted as flipped (the check does so too), which the
strict first inequality excludes; the alarm's comparison is strict as the certificate's.  The rows with j = y give
**always alarms**: lower(z_abs + offset - z_k) > 0 for every k, so every input of the box alarms.

Both rows are linear in h, so interval bounds of h fold them exactly as the label margin is folded
(:func:`harden.bounds.margin.folded_margin_lower`), and a backward linear relaxation takes them as its first rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harden.bounds.backward import Back
from harden.bounds.interval import Interval
from harden.bounds.linear import linear_parts
from harden.errors import HardenError


def abstain_rows(weight: torch.Tensor, bias: torch.Tensor | None, w_abstain: torch.Tensor, b_abstain: torch.Tensor,
                 y: torch.Tensor, offset: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows A [N, 2K, d] and constants c [N, 2K] on h: the K margin rows z_y - z_j (row y is zero), then the K
    abstain rows z_abs + offset - z_j."""
    k = weight.shape[0]
    n = y.shape[0]
    b = bias if bias is not None else torch.zeros(k, dtype=weight.dtype, device=weight.device)
    margin_a = weight[y].unsqueeze(1) - weight.unsqueeze(0)                        # [N, K, d]
    margin_c = b[y].unsqueeze(1) - b.unsqueeze(0)                                  # [N, K]
    abstain_a = (w_abstain.reshape(1, -1) - weight).unsqueeze(0).expand(n, -1, -1)  # [N, K, d]
    abstain_c = (b_abstain.reshape(()) + offset - b).unsqueeze(0).expand(n, -1)    # [N, K]
    return torch.cat([margin_a, abstain_a], 1), torch.cat([margin_c, abstain_c], 1)


def interval_rows_lower(h: Interval, A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, R] lower bounds of A h + c for h in the box ``h`` ([N, d]): centre and radius."""
    return torch.einsum("nrd,nd->nr", A, h.centre) - torch.einsum("nrd,nd->nr", A.abs(), h.radius) + c


def crown_rows_lower(engine, values: dict, fold, A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, R] lower bounds of A h + c by a backward linear relaxation from ``fold`` (the logits layer, whose input
    is h) down to the box, on the intermediate bounds ``values`` (a :class:`LinearBounds` pass's nodes)."""
    n, r, d = A.shape
    per_chunk = max(1, engine._chunk_rows(values, fold) // max(1, r))
    parts = []
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        rows = torch.arange(start, stop, device=A.device).repeat_interleave(r)
        call = engine._call(fold, values)
        x, _, _ = linear_parts(call)
        if x.dim() != 2:
            raise HardenError("the abstain certificate needs the logits layer's input flat ([N, d])")
        first = Back(call, None, rows)
        first.emit(x, A[start:stop].reshape(-1, d))
        first.add_bias(c[start:stop].reshape(-1))
        parts.append(engine._run(values, fold, first).reshape(stop - start, r))
    return torch.cat(parts)


@dataclass
class AbstainCertificate:
    """Per sample: the label margin's lower bound (robust), min_{j != y} max(margin_j, abstain_j) (detect-or-robust
    when > 0), and whether every input of the box alarms."""

    margin: torch.Tensor
    margin_detect: torch.Tensor
    always: torch.Tensor

    @property
    def robust(self) -> torch.Tensor:
        return self.margin > 0

    @property
    def detect_or_robust(self) -> torch.Tensor:
        return (self.margin_detect > 0) | self.always


def certificate_of(lower: torch.Tensor, y: torch.Tensor) -> AbstainCertificate:
    """From the [N, 2K] row lower bounds of :func:`abstain_rows` (margin rows, then abstain rows)."""
    k = lower.shape[1] // 2
    margin, abstain = lower[:, :k], lower[:, k:]
    own = torch.nn.functional.one_hot(y, k).bool()
    margin = margin.masked_fill(own, float("inf"))
    per_class = torch.maximum(margin, abstain.masked_fill(own, float("inf")))
    return AbstainCertificate(margin.amin(1), per_class.amin(1), abstain.amin(1) > 0)


def abstain_hinge(lower: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per sample, relu(kappa - min_{j != y} max(margin_j, abstain_j)): with kappa = 0 zero exactly where the
    certificate holds (every wrong class is beaten by the label or by the abstain score over the whole box), up to
    the boundary at 0.  (A box that always alarms has every abstain row > 0, so its hinge is zero too.)"""
    return torch.relu(kappa - certificate_of(lower, y).margin_detect)


def robust_ce(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, the K-class robust cross-entropy (IBP training's): CE of the worst-case logits -lower(z_y - z_j)."""
    k = lower.shape[1] // 2
    return torch.nn.functional.cross_entropy(-lower[:, :k], y, reduction="none")


def detection_ce(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, the detection cross-entropy of the paper: over the wrong classes and the abstain class, the
    abstain class is the correct answer for the whole box; its worst-case logits are -lower(z_abs - z_j) for each
    j != y and 0 for abstain (the true class is left out: beating the abstain score there is no error)."""
    k = lower.shape[1] // 2
    worst = -lower[:, k:].masked_fill(torch.nn.functional.one_hot(y, k).bool(), float("inf"))
    logits = torch.cat([worst, torch.zeros_like(worst[:, :1])], 1)
    return torch.nn.functional.cross_entropy(logits, torch.full_like(y, k), reduction="none")
