"""Element-wise activations by their end points: a monotone non-decreasing f maps [l, u] onto [f(l), f(u)]."""

from __future__ import annotations

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


FRESH_OUTPUTS.update({"relu", "relu6", "hardtanh", "leaky_relu", "sigmoid", "tanh"})
