"""Arithmetic: sums and differences of intervals, products and quotients sign-aware, cat and mean.

Either operand of a binary op may be the interval (``2 * x`` and ``x * 2``);
the other may be an interval too, a tensor (broadcast) or a number.
"""

from __future__ import annotations

import numbers

import torch

from harden.bounds.interval import Interval, as_interval
from harden.bounds.rules import BOUND_RULES, REQUIRED, Call, concrete_arg

aten = torch.ops.aten

_BINARY = (("input", REQUIRED), ("other", REQUIRED), ("alpha", 1))


def scale(x: Interval, c) -> Interval:
    """c x for a constant c (number or tensor): [min(c l, c u), max(c l, c u)]."""
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return Interval(c * x.lo, c * x.hi) if c >= 0 else Interval(c * x.hi, c * x.lo)
    a, b = c * x.lo, c * x.hi
    return Interval(torch.minimum(a, b), torch.maximum(a, b))


def add_intervals(a, b) -> Interval:
    """[a_l + b_l, a_u + b_u]; a constant operand shifts both ends."""
    if isinstance(a, Interval) and isinstance(b, Interval):
        return Interval(a.lo + b.lo, a.hi + b.hi)
    if isinstance(a, Interval):
        return Interval(a.lo + b, a.hi + b)
    return Interval(a + b.lo, a + b.hi)


def negate(x) -> Interval | object:
    return Interval(-x.hi, -x.lo) if isinstance(x, Interval) else -x


def multiply(a, b) -> Interval:
    """Interval x constant sign-aware; interval x interval: min and max of the four end-point products."""
    if isinstance(a, Interval) and isinstance(b, Interval):
        products = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
        return Interval(products.amin(dim=0), products.amax(dim=0))
    if isinstance(a, Interval):
        return scale(a, b)
    return scale(b, a)


def divide_by_interval(a, b: Interval) -> Interval:
    """a / y = a (1/y) with 1/y = [1/u, 1/l] where 0 is outside [l, u]; (-inf, inf) where y may be 0."""
    safe = (b.lo > 0) | (b.hi < 0)
    one = torch.ones_like(b.lo)
    recip = Interval(1.0 / torch.where(safe, b.hi, one), 1.0 / torch.where(safe, b.lo, one))
    out = multiply(a, recip)
    inf = torch.full_like(out.lo, float("inf"))
    return Interval(torch.where(safe, out.lo, -inf), torch.where(safe, out.hi, inf))


def _binary(call: Call) -> tuple[object, object, object]:
    p = call.bind(_BINARY)
    return p["input"], p["other"], concrete_arg(call, p["alpha"], "alpha")


@BOUND_RULES.register("add")
def add(call: Call) -> Interval:
    """a + alpha b: [a_l + (alpha b)_l, a_u + (alpha b)_u]."""
    a, b, alpha = _binary(call)
    if alpha != 1:
        b = multiply(b, alpha) if isinstance(b, Interval) else b * alpha
    return add_intervals(a, b)


@BOUND_RULES.register("sub")
def sub(call: Call) -> Interval:
    """a - alpha b: [a_l - (alpha b)_u, a_u - (alpha b)_l]."""
    a, b, alpha = _binary(call)
    if alpha != 1:
        b = multiply(b, alpha) if isinstance(b, Interval) else b * alpha
    return add_intervals(a, negate(b))


@BOUND_RULES.register("rsub")
def rsub(call: Call) -> Interval:
    """rsub(a, b, alpha) = b - alpha a: [b_l - (alpha a)_u, b_u - (alpha a)_l]."""
    a, b, alpha = _binary(call)
    if alpha != 1:
        a = multiply(a, alpha) if isinstance(a, Interval) else a * alpha
    return add_intervals(b, negate(a))


@BOUND_RULES.register("reciprocal")
def reciprocal(call: Call) -> Interval:
    """1/x = [1/u, 1/l] where 0 is outside [l, u]; (-inf, inf) where it is not."""
    return divide_by_interval(1.0, call.bind((("input", REQUIRED),))["input"])


@BOUND_RULES.register("neg")
def neg(call: Call) -> Interval:
    """-x: [-u, -l]."""
    return negate(call.bind((("input", REQUIRED),))["input"])


@BOUND_RULES.register("mul")
def mul(call: Call) -> Interval:
    """c x: [min(c l, c u), max(c l, c u)]; x y: min / max of the four end-point products."""
    p = call.bind((("input", REQUIRED), ("other", REQUIRED)))
    return multiply(p["input"], p["other"])


@BOUND_RULES.register("div")
def div(call: Call) -> Interval:
    """x / c: [min(l/c, u/c), max(l/c, u/c)]; a / y = a (1/y), 1/y unbounded where y may be 0; floor/trunc monotone."""
    p = call.bind((("input", REQUIRED), ("other", REQUIRED), ("rounding_mode", None)))
    a, b = p["input"], p["other"]
    if isinstance(b, Interval):
        out = divide_by_interval(a, b)
    else:
        q1, q2 = a.lo / b, a.hi / b
        out = Interval(torch.minimum(q1, q2), torch.maximum(q1, q2))
    mode = p["rounding_mode"]
    if mode == "floor":
        out = out.map(torch.floor)
    elif mode == "trunc":
        out = out.map(torch.trunc)
    elif mode is not None:
        raise call.fail(f"unknown rounding_mode {mode!r}")
    return out


@BOUND_RULES.register("cat")
def cat(call: Call) -> Interval:
    """cat: [cat(l_k), cat(u_k)]; constant parts are point intervals."""
    p = call.bind((("tensors", REQUIRED), ("dim", 0)))
    parts = [as_interval(t) for t in p["tensors"]]
    dim = p["dim"]
    return Interval(torch.cat([t.lo for t in parts], dim), torch.cat([t.hi for t in parts], dim))


_MEAN = (("input", REQUIRED), ("dim", None), ("keepdim", False), ("dtype", None))
_MEAN_ALL = (("input", REQUIRED), ("dtype", None))  # aten.mean.default


@BOUND_RULES.register("mean")
def mean(call: Call) -> Interval:
    """mean (non-negative weights, monotone): [mean(l), mean(u)]."""
    p = call.bind(_MEAN_ALL if call.target is aten.mean.default else _MEAN)
    x = p["input"]
    if not isinstance(x, Interval):
        raise call.fail("expected bounds for the input")
    dim, keepdim, dtype = p.get("dim"), p.get("keepdim", False), p.get("dtype")
    if dim is None:
        return x.map(lambda t: torch.mean(t, dtype=dtype))
    return x.map(lambda t: torch.mean(t, dim=dim, keepdim=keepdim, dtype=dtype))
