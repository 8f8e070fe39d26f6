"""Element-wise activations by their end points: a monotone non-decreasing f maps [l, u] onto [f(l), f(u)]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, FRESH_OUTPUTS, REQUIRED, Call, interval_arg

aten = torch.ops.aten

_INPUT_ONLY = (("input", REQUIRED), ("inplace", False))


def _no_params(_module) -> dict:
    return {}


def _input(call: Call) -> Interval:
    return interval_arg(call, call.bind(_INPUT_ONLY, _no_params)["input"], "the input")


def _monotone(call: Call, x: Interval, fn, fn_) -> Interval:
    """[f(l), f(u)] for a monotone non-decreasing element-wise f; in place (``fn_``) when the rule owns
    the bounds, and in one call when they share a buffer."""
    if call.owned and x.lo is not x.hi:
        if x.joint is not None:
            return Interval.from_joint(fn_(x.joint))
        return Interval(fn_(x.lo), fn_(x.hi))
    return x.map_channelwise(fn)


@BOUND_RULES.register("relu")
def relu(call: Call) -> Interval:
    """relu is monotone: [relu(l), relu(u)]."""
    return _monotone(call, _input(call), torch.relu, torch.relu_)


@BOUND_RULES.register("relu6")
def relu6(call: Call) -> Interval:
    """relu6(x) = clamp(x, 0, 6) is monotone: [clamp(l, 0, 6), clamp(u, 0, 6)] (also hardtanh(0, 6))."""
    # Spelled relu6(x[, inplace]) or hardtanh(x, 0, 6): the key already says the bounds are 0 and 6.
    x = interval_arg(call, call.first_input, "the input")
    return _monotone(call, x, lambda t: torch.clamp(t, 0.0, 6.0), lambda t: t.clamp_(0.0, 6.0))


_HARDTANH = (("input", REQUIRED), ("min_val", -1.0), ("max_val", 1.0), ("inplace", False))


@BOUND_RULES.register("hardtanh")
def hardtanh(call: Call) -> Interval:
    """hardtanh(x) = clamp(x, a, b) is monotone: [clamp(l, a, b), clamp(u, a, b)]."""
    p = call.bind(_HARDTANH, lambda m: {"min_val": m.min_val, "max_val": m.max_val})
    x = interval_arg(call, p["input"], "the input")
    lo, hi = float(p["min_val"]), float(p["max_val"])
    return _monotone(call, x, lambda t: torch.clamp(t, lo, hi), lambda t: t.clamp_(lo, hi))


_LEAKY = (("input", REQUIRED), ("negative_slope", 0.01), ("inplace", False))


@BOUND_RULES.register("leaky_relu")
def leaky_relu(call: Call) -> Interval:
    """f(x) = x (x >= 0), a x (x < 0): [f(l), f(u)] for a >= 0; for a < 0 f dips to 0 at x = 0."""
    p = call.bind(_LEAKY, lambda m: {"negative_slope": m.negative_slope})
    x = interval_arg(call, p["input"], "the input")
    slope = float(p["negative_slope"])
    f_lo, f_hi = F.leaky_relu(x.lo, slope), F.leaky_relu(x.hi, slope)
    if slope >= 0:
        return Interval(f_lo, f_hi)
    # Not monotone: decreasing on x < 0, increasing on x >= 0, minimum 0 at x = 0.
    straddles = (x.lo < 0) & (x.hi > 0)
    lo = torch.where(straddles, torch.zeros_like(f_lo), torch.minimum(f_lo, f_hi))
    return Interval(lo, torch.maximum(f_lo, f_hi))


@BOUND_RULES.register("sigmoid")
def sigmoid(call: Call) -> Interval:
    """sigmoid is monotone: [sigmoid(l), sigmoid(u)]."""
    return _monotone(call, _input(call), torch.sigmoid, torch.sigmoid_)


_HARDSIGMOID = (("input", REQUIRED), ("inplace", False))


@BOUND_RULES.register("hardsigmoid")
def hardsigmoid(call: Call) -> Interval:
    """hardsigmoid(x) = clamp(x / 6 + 1 / 2, 0, 1) is monotone: [f(l), f(u)]."""
    x = interval_arg(call, call.bind(_HARDSIGMOID, _no_params)["input"], "the input")
    return _monotone(call, x, F.hardsigmoid, lambda t: F.hardsigmoid(t, inplace=True))


@BOUND_RULES.register("tanh")
def tanh(call: Call) -> Interval:
    """tanh is monotone: [tanh(l), tanh(u)]."""
    return _monotone(call, _input(call), torch.tanh, torch.tanh_)


# softmax / log_softmax spell their third positional argument three different ways.
_SOFTMAX_SIGNATURES = {
    "functional": (("input", REQUIRED), ("dim", None), ("_stacklevel", 3), ("dtype", None)),
    "torch": (("input", REQUIRED), ("dim", REQUIRED), ("dtype", None)),
    "aten_private": (("input", REQUIRED), ("dim", REQUIRED), ("half_to_float", False)),
}


def _softmax_params(call: Call, name: str) -> tuple[Interval, int]:
    if call.target in (aten._softmax.default, aten._log_softmax.default):
        signature = _SOFTMAX_SIGNATURES["aten_private"]
    elif call.target in (F.softmax, F.log_softmax) or call.module is not None:
        signature = _SOFTMAX_SIGNATURES["functional"]
    else:
        signature = _SOFTMAX_SIGNATURES["torch"]
    p = call.bind(signature, lambda m: {"dim": m.dim})
    x = interval_arg(call, p["input"], "the input")
    if p.get("dtype") is not None:
        x = x.to(p["dtype"])
    dim = p["dim"]
    if dim is None:  # the legacy implicit dim of F.softmax / nn.Softmax
        dim = F._get_softmax_dim(name, x.dim(), 5)
    return x, int(dim)


def _log_softmax_bounds(x: Interval, dim: int) -> Interval:
    """log_softmax_i = x_i - log sum_j exp(x_j) grows with x_i and falls with every x_j, j != i:
    lower = l_i - log(e^l_i + sum_{j!=i} e^u_j), upper = u_i - log(e^u_i + sum_{j!=i} e^l_j)."""
    tiny = torch.finfo(x.dtype).tiny

    def log_sum_others(v: torch.Tensor) -> torch.Tensor:
        # log sum_{j != i} exp(v_j), shifted by the max for stability.
        shift = v.amax(dim=dim, keepdim=True).detach()
        e = torch.exp(v - shift)
        others = (e.sum(dim=dim, keepdim=True) - e).clamp_min(tiny)
        return torch.log(others) + shift

    lo = x.lo - torch.logaddexp(x.lo, log_sum_others(x.hi))
    hi = x.hi - torch.logaddexp(x.hi, log_sum_others(x.lo))
    if x.shape[dim] == 1:  # a single entry: log_softmax is identically 0
        lo, hi = torch.zeros_like(lo), torch.zeros_like(hi)
    return Interval(lo, hi)


@BOUND_RULES.register("log_softmax")
def log_softmax(call: Call) -> Interval:
    """log_softmax_i: [l_i - log(e^l_i + sum_{j!=i} e^u_j), u_i - log(e^u_i + sum_{j!=i} e^l_j)]."""
    x, dim = _softmax_params(call, "log_softmax")
    return _log_softmax_bounds(x, dim)


@BOUND_RULES.register("softmax")
def softmax(call: Call) -> Interval:
    """softmax_i = exp(log_softmax_i), exp monotone: exp of the log_softmax bounds."""
    x, dim = _softmax_params(call, "softmax")
    return _log_softmax_bounds(x, dim).map(torch.exp)


# --------------------------------------------------------------------------- smooth activations
# SiLU, GELU, hardswish and mish fall from 0 at -inf to one minimum, then rise: on [l, u] the maximum is at an
# end point and so is the minimum, unless the interval reaches the minimiser.  The minimiser is located once
# in float64 on a fine grid over a bracket: for a function with one valley the true minimiser lies within one
# grid step of the grid's lowest point, so an interval that reaches those two steps gets a floor below the
# minimum value (the lowest grid value less a margin far above the grid's error and float32 rounding).

_VALLEYS = {  # key -> a bracket of the minimiser (wide enough for every parameter the rule accepts)
    "silu": (-1.4, -1.15),
    "gelu": (-0.9, -0.6),
    "hardswish": (-1.6, -1.4),
    "mish": (-1.4, -1.0),
}
_valley_floor: dict[tuple, tuple[float, float, float]] = {}


def _floor(key: str, fn, extra: tuple = ()) -> tuple[float, float, float]:
    """(floor of the minimum value, the minimiser's bracket lo, hi) of ``fn``."""
    cached = _valley_floor.get((key, extra))
    if cached is None:
        a, b = _VALLEYS[key]
        grid = torch.linspace(a, b, 20001, dtype=torch.float64)
        values = fn(grid)
        k = int(values.argmin())
        if k in (0, len(grid) - 1):   # the minimiser is not inside the bracket: the rule would be unsound
            raise RuntimeError(f"{key}: the minimum lies outside its bracket {a, b}")
        cached = _valley_floor[(key, extra)] = (float(values[k]) - 1e-6, float(grid[k - 1]), float(grid[k + 1]))
    return cached


def _valley(call: Call, key: str, x: Interval, fn, extra: tuple = ()) -> Interval:
    f_lo, f_hi = fn(x.lo), fn(x.hi)
    floor, a, b = _floor(key, fn, extra)
    lowest = torch.minimum(f_lo, f_hi)
    lo = torch.where((x.lo <= b) & (x.hi >= a), torch.clamp(lowest, max=floor), lowest)
    return Interval(lo, torch.maximum(f_lo, f_hi))


@BOUND_RULES.register("silu")
def silu(call: Call) -> Interval:
    """silu(x) = x sigmoid(x): end points, or the valley's floor (minimum -0.2785 at x = -1.2785)."""
    return _valley(call, "silu", _input(call), F.silu)


@BOUND_RULES.register("hardswish")
def hardswish(call: Call) -> Interval:
    """hardswish(x) = x relu6(x + 3) / 6: end points, or the valley's floor (minimum -0.375 at x = -1.5)."""
    return _valley(call, "hardswish", _input(call), F.hardswish)


@BOUND_RULES.register("mish")
def mish(call: Call) -> Interval:
    """mish(x) = x tanh(softplus(x)): end points, or the valley's floor (minimum -0.3088 at x = -1.19)."""
    return _valley(call, "mish", _input(call), F.mish)


_GELU = (("input", REQUIRED), ("approximate", "none"))


@BOUND_RULES.register("gelu")
def gelu(call: Call) -> Interval:
    """gelu (exact or tanh-approximate): end points, or the valley's floor (minimum -0.170 at x = -0.752)."""
    p = call.bind(_GELU, lambda m: {"approximate": m.approximate})
    approximate = str(p["approximate"])
    if approximate not in ("none", "tanh"):
        raise call.fail(f"gelu approximate={approximate!r} is not one of 'none', 'tanh'")
    fn = lambda t: F.gelu(t, approximate=approximate)  # noqa: E731
    return _valley(call, "gelu", interval_arg(call, p["input"], "the input"), fn, (approximate,))


_ELU = (("input", REQUIRED), ("alpha", 1.0), ("inplace", False))


@BOUND_RULES.register("elu")
def elu(call: Call) -> Interval:
    """elu is monotone for alpha >= 0: [elu(l), elu(u)]."""
    p = call.bind(_ELU, lambda m: {"alpha": m.alpha})
    alpha = float(p["alpha"])
    if alpha < 0:
        raise call.fail(f"elu with alpha {alpha} < 0 is not monotone; no bound rule")
    x = interval_arg(call, p["input"], "the input")
    return Interval(F.elu(x.lo, alpha), F.elu(x.hi, alpha))


_SOFTPLUS = (("input", REQUIRED), ("beta", 1.0), ("threshold", 20.0))


@BOUND_RULES.register("softplus")
def softplus(call: Call) -> Interval:
    """softplus: [f(l), f(u)], widened to [<= t/beta, >= f_smooth(t/beta)] across the switch at t/beta."""
    # log(1 + exp(beta x)) / beta up to x = t / beta (threshold t), x above: each piece rises, but f drops at the
    # switch by log1p(exp(-t)) / beta (tiny for the default t = 20, large for a small t).
    p = call.bind(_SOFTPLUS, lambda m: {"beta": m.beta, "threshold": m.threshold})
    beta, threshold = float(p["beta"]), float(p["threshold"])
    if beta <= 0:
        raise call.fail(f"softplus with beta {beta} <= 0; no bound rule")
    x = interval_arg(call, p["input"], "the input")
    lo, hi = F.softplus(x.lo, beta, threshold), F.softplus(x.hi, beta, threshold)
    switch = threshold / beta
    crosses = (x.lo <= switch) & (x.hi > switch)
    drop = max(-threshold, 0.0) + math.log1p(math.exp(-abs(threshold)))   # log1p(exp(-t)), no overflow for t < 0
    smooth_top = switch + drop / beta                                      # the smooth piece's value at the switch
    lo = torch.where(crosses, torch.clamp(lo, max=switch), lo)
    hi = torch.where(crosses, torch.clamp(hi, min=smooth_top), hi)
    return Interval(lo, hi)


FRESH_OUTPUTS.update({"relu", "relu6", "hardtanh", "leaky_relu", "sigmoid", "hardsigmoid", "tanh", "silu",
                      "hardswish", "mish", "gelu", "elu", "softplus"})
