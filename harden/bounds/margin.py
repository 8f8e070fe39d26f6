"""The two pieces of the detect-or-robust certificate that certify and fine-tuning share: the no-alarm region of
a trap in terms of its pre-activation, and the label margin folded into the last linear layer.

Both are pure torch (differentiable): fine-tuning pushes the same margin that ``harden certify`` checks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from harden.bounds.interval import Interval
from harden.bounds.propagate import input_dependent
from harden.graph.ops import canonical_op
from harden.graph.trace import output_node

PRE_ACTIVATION_LIMIT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # relu(z) <= T  <=>  z <= T (for T >= 0; for T < 0 every input alarms anyway)
    "relu": lambda t: t,
    # relu6(z) <= T  <=>  z <= T while T < 6; from T >= 6 on every z qualifies
    "relu6": lambda t: torch.where(t < 6.0, t, torch.full_like(t, float("inf"))),
}
"""Per trap activation: the largest pre-activation z whose activation stays <= T (no alarm)."""


def true_margin_lower(logit_margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min over j != y of a [N, K] lower bound of logit_y - logit_j."""
    inf = torch.full_like(logit_margin_lower[:, :1], float("inf"))
    return logit_margin_lower.scatter(1, y.unsqueeze(1), inf).amin(dim=1)


def folded_margin_lower(x: Interval, weight: torch.Tensor, bias: torch.Tensor | None,
                        y: torch.Tensor) -> torch.Tensor:
    """Per sample, a lower bound of min_{j != y} (logit_y - logit_j) for logits = W x + b, x in the box ``x``
    ([N, d]): the rows W_y - W_j meet the box's centre and radius, which is much tighter than subtracting two
    logit intervals (that loses every correlation between them)."""
    diff = weight[y].unsqueeze(1) - weight.unsqueeze(0)                    # [N, K, d]: W_y - W_j
    lower = torch.einsum("nkd,nd->nk", diff, x.centre) - torch.einsum("nkd,nd->nk", diff.abs(), x.radius)
    if bias is not None:
        lower = lower + (bias[y].unsqueeze(1) - bias.unsqueeze(0))
    return true_margin_lower(lower, y)


def subtracted_margin_lower(logits: Interval, y: torch.Tensor) -> torch.Tensor:
    """The margin's lower bound from logit intervals alone: l_y - u_j (when the logits are not a linear layer)."""
    return true_margin_lower(logits.lo.gather(1, y.unsqueeze(1)) - logits.hi, y)


def final_linear(gm: fx.GraphModule) -> fx.Node | None:
    """The logits node when it is a linear layer (any spelling) fed by the input: its margin can be folded."""
    last = output_node(gm).args[0]
    if isinstance(last, fx.Node) and canonical_op(gm, last) == "linear" and last in input_dependent(gm):
        return last
    return None
