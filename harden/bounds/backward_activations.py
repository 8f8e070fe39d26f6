"""Backward rules of piecewise-linear activations: a linear lower and upper bound on the input interval.

ReLU on an unstable interval l < 0 < u: upper bound the chord ``u (x - l) / (u - l)``,
lower bound ``a x`` with the standard adaptive slope a = 1 if u > -l else 0
(Zhang et al. 2018); on a stable interval the ReLU is exactly 0 or x.
"""

from __future__ import annotations

import torch

from harden.bounds.activations import _HARDTANH, _LEAKY
from harden.bounds.backward import Back, backward_rule, flat_sum, relax_elementwise, segments
from harden.bounds.interval import Interval
from harden.bounds.rules import interval_arg


def _chord(lo: torch.Tensor, hi: torch.Tensor, f_lo: torch.Tensor, f_hi: torch.Tensor):
    """Slope and intercept of the line through (l, f(l)) and (u, f(u)); slope 0 where l == u."""
    width = hi - lo
    safe = torch.where(width > 0, width, torch.ones_like(width))
    slope = torch.where(width > 0, (f_hi - f_lo) / safe, torch.zeros_like(width))
    return slope, f_lo - slope * lo


def relu_relaxation(x: Interval):
    """(lower slope, upper slope, upper intercept) of ReLU over [l, u]; the lower intercept is 0."""
    lo, hi = x.lo, x.hi
    active, unstable = lo >= 0, (lo < 0) & (hi > 0)
    up_slope, up_icpt = _chord(lo, hi, torch.zeros_like(lo), hi)
    up_slope = torch.where(unstable, up_slope, active.to(lo.dtype))
    up_icpt = torch.where(unstable, up_icpt, torch.zeros_like(lo))
    low_slope = torch.where(unstable, (hi > -lo).to(lo.dtype), active.to(lo.dtype))
    return low_slope, up_slope, up_icpt


def _unstable_at(*kinks: float):
    def mask(x: Interval) -> torch.Tensor:
        out = torch.zeros_like(x.lo, dtype=torch.bool)
        for k in kinks:
            out |= (x.lo < k) & (x.hi > k)
        return out

    return mask


def _input(back: Back) -> Interval:
    return interval_arg(back.call, back.call.first_input, "the input")


@backward_rule("relu", relaxes=_unstable_at(0.0))
def relu(back: Back) -> None:
    """ReLU: 0 / x on stable inputs; a x <= relu(x) <= u (x - l) / (u - l) on unstable ones."""
    x = _input(back)
    low_slope, up_slope, up_icpt = back.remember("relu", x, lambda: relu_relaxation(x))
    A = back.A
    runs = segments(back.rows)
    if runs is not None:   # parameters broadcast per sample instead of gathered per row
        parts = [(A[i:j], s) for s, i, j in runs]
        back.emit(x, torch.cat([a * torch.where(a >= 0, low_slope[s], up_slope[s]) for a, s in parts]))
        back.add_bias(torch.cat([a.clamp(max=0).reshape(a.shape[0], -1).matmul(up_icpt[s].reshape(-1))
                                 for a, s in parts]))
        return
    # one pass picks the slope by the sign of A (lower relaxation for A >= 0, upper for A < 0)
    back.emit(x, A * torch.where(A >= 0, back.per_row(low_slope), back.per_row(up_slope)))
    back.add_bias(flat_sum(A.clamp(max=0) * back.per_row(up_icpt)))


def clamp_relaxation(x: Interval, a: float, b: float):
    """(ls, lb, us, ub) for clamp(x, a, b) over [l, u].

    Below a, between and above b it is constant / identity / constant.  Crossing only a it is
    convex (ReLU-like: chord above, slope 1 or 0 below); crossing only b concave (mirror image);
    crossing both: the lines through (l, a)-(b, b) above and (a, a)-(u, b) below.
    """
    lo, hi = x.lo, x.hi
    one, zero = torch.ones_like(lo), torch.zeros_like(lo)
    f_lo, f_hi = lo.clamp(a, b), hi.clamp(a, b)
    chord_s, chord_i = _chord(lo, hi, f_lo, f_hi)
    cross_a, cross_b = (lo < a) & (hi > a), (lo < b) & (hi > b)
    only_a, only_b, both = cross_a & ~cross_b, cross_b & ~cross_a, cross_a & cross_b
    # stable: constant a (hi <= a), identity, constant b (lo >= b)
    ident = (lo >= a) & (hi <= b)
    const = torch.where(hi <= a, torch.full_like(lo, a), torch.where(lo >= b, torch.full_like(lo, b), zero))
    ls, lb = torch.where(ident, one, zero), torch.where(ident, zero, const)
    us, ub = ls.clone(), lb.clone()
    # only a: upper chord; lower slope 1 (x) if more of the interval is above a, else the constant a
    steep = (hi - a) > (a - lo)
    ls = torch.where(only_a, steep.to(lo.dtype), ls)
    lb = torch.where(only_a, torch.where(steep, zero, torch.full_like(lo, a)), lb)
    us, ub = torch.where(only_a, chord_s, us), torch.where(only_a, chord_i, ub)
    # only b: lower chord; upper slope 1 (x) if more of the interval is below b, else the constant b
    flat = (hi - b) > (b - lo)
    ls, lb = torch.where(only_b, chord_s, ls), torch.where(only_b, chord_i, lb)
    us = torch.where(only_b, (~flat).to(lo.dtype), us)
    ub = torch.where(only_b, torch.where(flat, torch.full_like(lo, b), zero), ub)
    # both kinks
    up_s, up_i = _chord(lo, torch.full_like(lo, b), torch.full_like(lo, a), torch.full_like(lo, b))
    low_s, low_i = _chord(torch.full_like(lo, a), hi, torch.full_like(lo, a), torch.full_like(lo, b))
    ls, lb = torch.where(both, low_s, ls), torch.where(both, low_i, lb)
    us, ub = torch.where(both, up_s, us), torch.where(both, up_i, ub)
    return ls, lb, us, ub


@backward_rule("relu6", relaxes=_unstable_at(0.0, 6.0))
def relu6(back: Back) -> None:
    """relu6 = clamp(x, 0, 6): see :func:`clamp_relaxation`."""
    x = _input(back)
    relax_elementwise(back, x, *back.remember("relu6", x, lambda: clamp_relaxation(x, 0.0, 6.0)))


def _hardtanh_range(back: Back) -> tuple[Interval, float, float]:
    p = back.call.bind(_HARDTANH, lambda m: {"min_val": m.min_val, "max_val": m.max_val})
    return interval_arg(back.call, p["input"], "the input"), float(p["min_val"]), float(p["max_val"])


def _hardtanh_unstable(x: Interval) -> torch.Tensor:
    # The kinks are not known here (they are the call's): refine every neuron; hardtanh nets are rare.
    return torch.ones_like(x.lo, dtype=torch.bool)


@backward_rule("hardtanh", relaxes=_hardtanh_unstable)
def hardtanh(back: Back) -> None:
    """hardtanh = clamp(x, a, b): see :func:`clamp_relaxation`."""
    x, a, b = _hardtanh_range(back)
    relax_elementwise(back, x, *clamp_relaxation(x, a, b))


@backward_rule("hardsigmoid", relaxes=_unstable_at(-3.0, 3.0))
def hardsigmoid(back: Back) -> None:
    """hardsigmoid(x) = clamp(y, 0, 1), y = x / 6 + 1 / 2: the clamp's relaxation in y, mapped back to x."""
    x = _input(back)

    def relaxation():
        y = Interval(x.lo / 6 + 0.5, x.hi / 6 + 0.5)
        ls, lb, us, ub = clamp_relaxation(y, 0.0, 1.0)
        return ls / 6, lb + ls * 0.5, us / 6, ub + us * 0.5

    relax_elementwise(back, x, *back.remember("hardsigmoid", x, relaxation))


@backward_rule("leaky_relu", relaxes=_unstable_at(0.0))
def leaky_relu(back: Back) -> None:
    """f(x) = x (x >= 0), s x (x < 0).  For s <= 1 f is convex: chord above, slope 1 or s below (adaptive);
    for s > 1 concave: chord below, slope 1 or s above."""
    p = back.call.bind(_LEAKY, lambda m: {"negative_slope": m.negative_slope})
    x = interval_arg(back.call, p["input"], "the input")
    s = float(p["negative_slope"])
    lo, hi = x.lo, x.hi
    unstable = (lo < 0) & (hi > 0)
    exact = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, s))
    chord_s, chord_i = _chord(lo, hi, torch.where(lo >= 0, lo, s * lo), torch.where(hi >= 0, hi, s * hi))
    chord_i = torch.where(unstable, chord_i, torch.zeros_like(lo))
    chord_s = torch.where(unstable, chord_s, exact)
    mostly_positive = hi > -lo
    tangent = torch.where(unstable, torch.where(mostly_positive, torch.ones_like(lo), torch.full_like(lo, s)), exact)
    if s <= 1:
        relax_elementwise(back, x, tangent, None, chord_s, chord_i)
    else:
        relax_elementwise(back, x, chord_s, chord_i, tangent, None)
