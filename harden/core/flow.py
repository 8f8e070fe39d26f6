"""The flow-field threat (thesis 001, section 2.3; Xiao et al. 2018): every pixel moves by its own flow vector.

A flow field ``r`` is a tensor [N, 2, H, W] in pixel units: ``r[:, 0]`` moves along rows (down is positive),
``r[:, 1]`` along columns (right is positive).  The transformed image samples the input at
``(row + r0, col + r1)`` by bilinear interpolation (Eq. 4), every channel with the same flow.  A position
outside the image is clamped to its border (torch's ``grid_sample`` ``padding_mode="border"``), so a
transformed pixel is always a convex combination of input pixels and stays inside the input range.

Budgets: a per-pixel magnitude ``|r0|, |r1| <= delta`` and the total variation of Eq. 6,
``TV(r) = sum_p sum_{q in N(p)} sqrt((r0_p - r0_q)^2 + (r1_p - r1_q)^2)`` with N(p) the 4-neighbourhood
inside the image (every edge counted from both of its ends, as Eq. 6 is written).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harden.errors import HardenError


def _check(x: torch.Tensor, flow: torch.Tensor) -> None:
    if x.dim() != 4:
        raise HardenError(f"flow fields move images [N, C, H, W]; got input of shape {tuple(x.shape)}")
    want = (x.shape[0], 2, x.shape[2], x.shape[3])
    if tuple(flow.shape) != want:
        raise HardenError(f"a flow field for input {tuple(x.shape)} has shape {want}; got {tuple(flow.shape)}")


def sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """The ``grid_sample`` grid [N, H, W, 2] (x = column, y = row, normalised with align_corners=True)."""
    n, _, h, w = flow.shape
    rows = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    cols = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    # A one-pixel axis has one position whatever the flow: any normalised value reads it.
    gy = 2 * (rows + flow[:, 0]) / max(h - 1, 1) - 1
    gx = 2 * (cols + flow[:, 1]) / max(w - 1, 1) - 1
    return torch.stack((gx, gy), dim=-1)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Eq. 4: the image sampled at every pixel's position plus its flow, bilinearly, border-clamped."""
    _check(x, flow)
    return F.grid_sample(x, sampling_grid(flow.to(x.dtype)), mode="bilinear", padding_mode="border",
                         align_corners=True)


def _edge_norms(flow: torch.Tensor, smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    d_rows = flow[:, :, 1:, :] - flow[:, :, :-1, :]     # vertical edges [N, 2, H-1, W]
    d_cols = flow[:, :, :, 1:] - flow[:, :, :, :-1]     # horizontal edges [N, 2, H, W-1]
    return (d_rows.pow(2).sum(1) + smooth).sqrt(), (d_cols.pow(2).sum(1) + smooth).sqrt()


def total_variation(flow: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """Eq. 6 per sample [N]: twice the sum over 4-neighbour edges of the flow difference's L2 norm.

    ``smooth`` > 0 adds that much under each square root (a loss needs a gradient where two neighbours
    agree); budgets and reports use the exact value (0).
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise HardenError(f"a flow field has shape [N, 2, H, W]; got {tuple(flow.shape)}")
    vertical, horizontal = _edge_norms(flow, smooth)
    return 2 * (vertical.flatten(1).sum(1) + horizontal.flatten(1).sum(1))


def project(flow: torch.Tensor, delta: float | None = None, tv: float | None = None) -> torch.Tensor:
    """A flow inside both budgets: each component clipped to [-delta, delta], then the whole field scaled down
    until TV <= tv.  Clipping never raises the TV (it is 1-Lipschitz per component) and TV is positively
    homogeneous, so the result meets both budgets exactly (scaled to just under tv against rounding)."""
    if delta is not None:
        flow = flow.clamp(-float(delta), float(delta))
    if tv is not None:
        current = total_variation(flow)
        scale = torch.where(current > tv, tv * (1 - 1e-6) / current.clamp_min(1e-30), torch.ones_like(current))
        flow = flow * scale.view(-1, 1, 1, 1)
    return flow


def check_budget(delta: float | None, tv: float | None) -> None:
    """One line for an impossible budget."""
    for name, value in (("delta", delta), ("tv", tv)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise HardenError(f"flow budget {name}={value!r} must be a finite number >= 0")
