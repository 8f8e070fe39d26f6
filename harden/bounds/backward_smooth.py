"""Backward rules of smooth element-wise activations: two lines parallel to the chord, enclosing f on [l, u].

For f with |f'| <= L everywhere, take the chord slope a = (f(u) - f(l)) / (u - l) and g(x) = f(x) - a x,
whose slope is at most L + |a| in size.  Every x of [l, u] lies within h / 2 of a point of a grid of
spacing h, so over [l, u]

    a x + min_k g(x_k) - (L + |a|) h / 2  <=  f(x)  <=  a x + max_k g(x_k) + (L + |a|) h / 2.

Sound for any such f given a true L (a point interval is exact), and as tight as the chord allows: no
case analysis of convex and concave parts.  Softplus is left out: with a finite threshold it jumps at the
switch, so no L holds across it (its nodes are bounded by their intervals, see :mod:`harden.bounds.crown`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from harden.bounds.activations import _ELU, _GELU
from harden.bounds.backward import Back, backward_rule, relax_elementwise
from harden.bounds.interval import Interval
from harden.bounds.rules import interval_arg

GRID = 17
"""Grid points per interval (16 steps): the margin is (L + |a|) / 32 of the interval's width."""

ROUNDING = 1e-6
"""Added to the margin, relative to the larger of |f| at the end points and 1: float32 evaluation of f."""


def chord_band(x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], lipschitz: float):
    """(slope, lower intercept, slope, upper intercept) of the two chord-parallel lines around f on [l, u]."""
    lo, hi = x.lo, x.hi
    width = (hi - lo).clamp_min(0)
    steps = torch.linspace(0, 1, GRID, dtype=lo.dtype, device=lo.device)
    grid = lo.unsqueeze(-1) + width.unsqueeze(-1) * steps                      # [..., GRID]
    values = fn(grid)
    f_lo, f_hi = values[..., 0], values[..., -1]
    safe = torch.where(width > 0, width, torch.ones_like(width))
    slope = torch.where(width > 0, (f_hi - f_lo) / safe, torch.zeros_like(width))
    g = values - slope.unsqueeze(-1) * grid
    margin = (lipschitz + slope.abs()) * width / (2 * (GRID - 1))
    margin = margin + ROUNDING * torch.maximum(torch.maximum(f_lo.abs(), f_hi.abs()), torch.ones_like(f_lo))
    return slope, g.amin(dim=-1) - margin, slope, g.amax(dim=-1) + margin


def _smooth(key: str, lipschitz: float, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def rule(back: Back) -> None:
        x = interval_arg(back.call, back.call.first_input, "the input")
        relax_elementwise(back, x, *back.remember(key, x, lambda: chord_band(x, fn, lipschitz)))

    rule.__doc__ = f"{key}: chord-parallel lines enclosing f on [l, u] (|f'| <= {lipschitz})."
    backward_rule(key)(rule)


# Upper bounds of |f'| over the real line (the exact maxima, rounded up).
_smooth("sigmoid", 0.25, torch.sigmoid)
_smooth("tanh", 1.0, torch.tanh)
_smooth("silu", 1.1, F.silu)                # max 1.0998 at x = 2.40
_smooth("hardswish", 1.5, F.hardswish)      # (2x + 3) / 6 on [-3, 3]: 1.5 at x = 3
_smooth("mish", 1.1, F.mish)                # max 1.0886


@backward_rule("gelu")
def gelu(back: Back) -> None:
    """gelu (exact or tanh): chord-parallel lines enclosing f on [l, u] (|f'| <= 1.15)."""
    p = back.call.bind(_GELU, lambda m: {"approximate": m.approximate})
    approximate = str(p["approximate"])
    if approximate not in ("none", "tanh"):
        raise back.call.fail(f"gelu approximate={approximate!r} is not one of 'none', 'tanh'")
    x = interval_arg(back.call, p["input"], "the input")
    fn = lambda t: F.gelu(t, approximate=approximate)  # noqa: E731
    relax_elementwise(back, x, *back.remember(f"gelu-{approximate}", x, lambda: chord_band(x, fn, 1.15)))


@backward_rule("elu")
def elu(back: Back) -> None:
    """elu (alpha >= 0): chord-parallel lines enclosing f on [l, u] (|f'| <= max(1, alpha))."""
    p = back.call.bind(_ELU, lambda m: {"alpha": m.alpha})
    alpha = float(p["alpha"])
    if alpha < 0:
        raise back.call.fail(f"elu with alpha {alpha} < 0 has no backward rule")
    x = interval_arg(back.call, p["input"], "the input")
    fn = lambda t: F.elu(t, alpha)  # noqa: E731
    relax_elementwise(back, x, *back.remember(f"elu-{alpha}", x, lambda: chord_band(x, fn, max(1.0, alpha))))
