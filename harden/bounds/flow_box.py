"""The exact range of every transformed pixel when each pixel's flow lies in one rectangle of offsets.

A transformed pixel depends on its own flow only (:func:`harden.core.flow.warp`): as a function of the
offset (a, b) it reads the input at ``(clamp(row + a), clamp(col + b))``, which is bilinear on every unit
cell of integer offsets (the border clamp breaks at integer offsets too, the pixel's row being an integer).
A function bilinear on each cell of a rectangle takes its extremes at the corners of the cells it is cut
into, so over the offset rectangle [a_lo, a_hi] x [b_lo, b_hi] the pixel's minimum and maximum are among its
values at the offsets {a_lo, a_hi} u (integers strictly between) crossed with the same for b.

When every pixel's flow ranges independently over the same rectangle (the per-pixel budget |r| <= delta),
the set of transformed images is exactly the product of these ranges: the box is exact, not a relaxation.
"""

from __future__ import annotations

import math

import torch

from harden.bounds.interval import Interval
from harden.errors import HardenError

SLACK = 1e-6
"""Relative widening of every range (times the image's largest |value|, at least 1): the ranges are computed
in float64 and the model reads float32 images made by ``grid_sample``, whose rounding differs by ulps."""


def offsets(lo: float, hi: float) -> list[float]:
    """The candidate offsets of one axis: both ends and every integer strictly between them."""
    if not lo <= hi:
        raise HardenError(f"empty offset range [{lo}, {hi}]")
    inner = range(math.floor(lo) + 1, math.ceil(hi))
    return sorted({float(lo), float(hi), *(float(k) for k in inner if lo < k < hi)})


def translate(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Every pixel read at (row + a, col + b), border-clamped, bilinear: ``warp`` by a constant flow, in x's dtype."""
    _, _, h, w = x.shape

    def axis(size: int, shift: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = (torch.arange(size, dtype=torch.float64, device=device) + shift).clamp(0, size - 1)
        first = pos.floor().long().clamp(max=size - 1)
        second = (first + 1).clamp(max=size - 1)
        return first, second, (pos - first).to(x.dtype)

    r0, r1, fr = axis(h, a, x.device)
    c0, c1, fc = axis(w, b, x.device)
    top = x[:, :, r0, :] * (1 - fr).view(1, 1, -1, 1) + x[:, :, r1, :] * fr.view(1, 1, -1, 1)
    return top[:, :, :, c0] * (1 - fc).view(1, 1, 1, -1) + top[:, :, :, c1] * fc.view(1, 1, 1, -1)


def pixel_range(x: torch.Tensor, rows: tuple[float, float], cols: tuple[float, float]) -> Interval:
    """[lo, hi] of every pixel of ``warp(x, r)`` over all flows whose every vector lies in
    ``rows`` x ``cols`` (offset ranges in pixels), widened by :data:`SLACK`."""
    if x.dim() != 4:
        raise HardenError(f"flow bounds need images [N, C, H, W]; got {tuple(x.shape)}")
    x64 = x.detach().to(torch.float64)
    lo = hi = None
    for a in offsets(*rows):
        for b in offsets(*cols):
            moved = translate(x64, a, b)
            lo = moved if lo is None else torch.minimum(lo, moved)
            hi = moved if hi is None else torch.maximum(hi, moved)
    scale = x64.abs().flatten(1).amax(1).clamp_min(1.0).view(-1, 1, 1, 1)
    return Interval((lo - SLACK * scale).to(x.dtype), (hi + SLACK * scale).to(x.dtype))


def flow_box(x: torch.Tensor, delta: float) -> Interval:
    """The exact box of images ``warp(x, r)`` with every flow component in [-delta, delta]."""
    if not (math.isfinite(delta) and delta >= 0):
        raise HardenError(f"flow delta must be a finite number >= 0; got {delta}")
    return pixel_range(x, (-delta, delta), (-delta, delta))
