"""The CTT regularisers (paper 000, Eq. 5-7), per sample, summed over sites and masked neurons.

With m the mask, x the natural activation and [lo, hi] its interval over the
eps-box around the input:

- L_D  = sum(m * x * [x > T])      natural inputs stay quiet
- L_LC = sum(m * relu(T - hi))     loose: some perturbation can fire the trap
- L_SC = sum(m * relu(T - lo))     strict: every perturbation fires it

The paper writes Eq. 6-7 as ``M(B, T) * (T - B)`` with M(B, T) = [B > T],
which would only ever count bounds that already exceed T (and with a negative
sign).  The text's intent — "the distance between the detection threshold and
the bound when the threshold is bigger than the bound" — is ``[B < T] * (T - B)``,
i.e. ``relu(T - B)``; that is what is computed here.
"""

from __future__ import annotations

import torch

from harden.bounds.interval import Interval

CERTIFICATION_BOUND = {"loose": "hi", "strict": "lo"}


def detection_loss(activation: torch.Tensor, indices: torch.Tensor, threshold: float,
                   margin: float = 0.0) -> torch.Tensor:
    """L_D per sample: masked natural activations above T, summed (the paper's ``x * [x > T]``).

    With ``margin > 0`` the hinge ``relu(x - (T - margin))`` instead: natural values are pushed down to
    ``T - margin``, so they sit clearly below T rather than on it.  On a ReLU's *input* (pre-activation) z,
    ``z * [z > T]`` equals the paper's loss on relu(z) for T > 0, and a margin larger than T pushes z below 0.
    """
    return detection_hinge(activation.flatten(1).index_select(1, indices), threshold, margin)


def detection_hinge(masked: torch.Tensor, threshold: float, margin: float = 0.0) -> torch.Tensor:
    """:func:`detection_loss` on values already gathered at the masked positions, shape [N, count]."""
    if margin:
        return torch.relu(masked - (threshold - margin)).sum(dim=1)
    return (masked * (masked > threshold)).sum(dim=1)


def certification_loss(bounds: Interval, indices: torch.Tensor, threshold: float, kind: str,
                       margin: float = 0.0) -> torch.Tensor:
    """L_LC (kind 'loose', on the upper bound) or L_SC ('strict', on the lower bound) per sample.

    ``margin`` asks the bound to clear T by that much: ``relu(T + margin - bound)``.
    """
    bound = getattr(bounds, CERTIFICATION_BOUND[kind])
    return certification_hinge(bound.flatten(1).index_select(1, indices), threshold, margin)


def certification_hinge(masked_bound: torch.Tensor, threshold: float, margin: float = 0.0) -> torch.Tensor:
    """:func:`certification_loss` on the bound (hi for loose, lo for strict) already gathered at the masked
    positions, shape [N, count]."""
    return torch.relu(threshold + margin - masked_bound).sum(dim=1)


def certificate_hinge(margin: torch.Tensor, always: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """The detect-or-robust (or robust) certificate as a loss, per sample: ``relu(kappa - m)``, m a lower bound
    of the true class's margin over the box (intersected with the no-alarm region), and 0 where every input of
    the box alarms (``always``).  With kappa = 0 it is zero exactly where the certificate (m > 0, or always)
    holds, up to the boundary m = 0; kappa > 0 asks the bound to clear zero by kappa."""
    return torch.where(always, torch.zeros_like(margin), torch.relu(kappa - margin))
