"""Normalisation: batch norm in eval mode is a per-channel affine map a x + c (sign-aware in a); layer norm
normalises by the input's own statistics, bounded through the mean and variance over the box."""

from __future__ import annotations

import math

import torch

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, FRESH_OUTPUTS, REQUIRED, Call, concrete_arg, interval_arg

aten = torch.ops.aten

_FUNCTIONAL = (  # F.batch_norm
    ("input", REQUIRED), ("running_mean", REQUIRED), ("running_var", REQUIRED), ("weight", None),
    ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5),
)
_ATEN = (  # aten.batch_norm.default
    ("input", REQUIRED), ("weight", None), ("bias", None), ("running_mean", None), ("running_var", None),
    ("training", False), ("momentum", 0.1), ("eps", 1e-5), ("cudnn_enabled", False),
)
_ATEN_NO_TRAINING = (  # aten._native_batch_norm_legit_no_training.default, returns (out, mean, invstd)
    ("input", REQUIRED), ("weight", None), ("bias", None), ("running_mean", REQUIRED), ("running_var", REQUIRED),
    ("momentum", 0.1), ("eps", 1e-5),
)


def _module_params(m) -> dict:
    uses_batch_stats = m.training or m.running_mean is None or m.running_var is None
    return {"weight": m.weight, "bias": m.bias, "running_mean": m.running_mean, "running_var": m.running_var,
            "eps": m.eps, "training": uses_batch_stats}


def _signature(call: Call):
    if call.target is aten._native_batch_norm_legit_no_training.default:
        return _ATEN_NO_TRAINING
    if call.target is aten.batch_norm.default:
        return _ATEN
    return _FUNCTIONAL


@BOUND_RULES.register("batch_norm")
def batch_norm(call: Call):
    """y = a x + c per channel, a = w / sqrt(var + eps), c = b - a mean: [a+ l + a- u + c, a+ u + a- l + c]."""
    p = call.bind(_signature(call), _module_params)
    x = interval_arg(call, p["input"], "the input")
    if p.get("training"):
        raise call.fail("batch norm with batch statistics (training mode or no running stats) cannot be "
                        "bounded per sample; put the model in eval mode")
    mean = concrete_arg(call, p["running_mean"], "running_mean")
    var = concrete_arg(call, p["running_var"], "running_var")
    if mean is None or var is None:
        raise call.fail("batch norm without running statistics cannot be bounded")
    weight = concrete_arg(call, p["weight"], "weight")
    bias = concrete_arg(call, p["bias"], "bias")
    scale = torch.rsqrt(var + float(p["eps"]))
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    view = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.reshape(view), shift.reshape(view)
    pos, neg = scale.clamp(min=0), scale.clamp(max=0)
    out = Interval(pos * x.lo + neg * x.hi + shift, pos * x.hi + neg * x.lo + shift)
    if call.target is aten._native_batch_norm_legit_no_training.default:
        empty = x.lo.new_zeros(0)
        return (out, empty, empty)
    return out


FRESH_OUTPUTS.update({"batch_norm"})


# --------------------------------------------------------------------------- layer norm
_LAYER_NORM = (("input", REQUIRED), ("normalized_shape", REQUIRED), ("weight", None), ("bias", None),
               ("eps", 1e-5), ("cudnn_enable", True))


def _layer_norm_module(m) -> dict:
    return {"normalized_shape": m.normalized_shape, "weight": m.weight, "bias": m.bias, "eps": m.eps}


def layer_norm_bounds(x: Interval, k: int, eps: float) -> Interval:
    """(x_i - mean x) / sqrt(var x + eps) over the last ``k`` dims, before the affine part.

    d_i = x_i - mean x is linear: by centre and radius, d_i = c_i - mean c +- (r_i (1 - 1/n) + (R - r_i) / n)
    (R the sum of the radii over the n normalised entries).  var = mean_j d_j^2 lies between the means of each
    d_j^2's smallest and largest value on its interval, so s = sqrt(var + eps) in [s_l, s_u]; d_i / s takes its
    extremes at those ends by the sign of d_i.  |d_i| <= sqrt((n - 1) var) caps |y_i| at sqrt(n - 1).

    Computed in float64, so the bounds hold the exact value; the model's own float32 layer norm differs from it
    by its rounding, about 0.2 n u max|x| / s (u the unit round-off; measured), which a row of nearly equal
    entries (small s) magnifies: like every rule here, the bounds do not widen for the forward pass's rounding.
    """
    shape, dtype = x.shape, x.lo.dtype
    lo, hi = (x.lo.flatten(-k), x.hi.flatten(-k)) if k > 1 else (x.lo, x.hi)
    lo, hi = lo.double(), hi.double()
    n = lo.shape[-1]
    centre, radius = (hi + lo) * 0.5, (hi - lo) * 0.5
    d_centre = centre - centre.mean(-1, keepdim=True)
    d_radius = radius * (1 - 1 / n) + (radius.sum(-1, keepdim=True) - radius) / n
    d_lo, d_hi = d_centre - d_radius, d_centre + d_radius
    straddles = (d_lo < 0) & (d_hi > 0)
    sq_lo = torch.where(straddles, torch.zeros_like(d_lo), torch.minimum(d_lo * d_lo, d_hi * d_hi))
    sq_hi = torch.maximum(d_lo * d_lo, d_hi * d_hi)
    dev_lo = torch.sqrt(sq_lo.mean(-1, keepdim=True) + eps)
    dev_hi = torch.sqrt(sq_hi.mean(-1, keepdim=True) + eps)
    y_lo = torch.where(d_lo >= 0, d_lo / dev_hi, d_lo / dev_lo)
    y_hi = torch.where(d_hi >= 0, d_hi / dev_lo, d_hi / dev_hi)
    cap = math.sqrt(max(n - 1, 0))
    y_lo, y_hi = y_lo.clamp(-cap, cap), y_hi.clamp(-cap, cap)
    return Interval(y_lo.to(dtype).reshape(shape), y_hi.to(dtype).reshape(shape))


@BOUND_RULES.register("layer_norm")
def layer_norm(call: Call) -> Interval:
    """layer norm: the normalised bounds of :func:`layer_norm_bounds`, then w y + b sign-aware in w."""
    p = call.bind(_LAYER_NORM, _layer_norm_module)
    x = interval_arg(call, p["input"], "the input")
    normalized = concrete_arg(call, p["normalized_shape"], "normalized_shape")
    k = len(normalized) if isinstance(normalized, (list, tuple, torch.Size)) else 1
    y = layer_norm_bounds(x, k, float(p["eps"]))
    weight, bias = concrete_arg(call, p["weight"], "weight"), concrete_arg(call, p["bias"], "bias")
    if weight is not None:
        pos, neg = weight.clamp(min=0), weight.clamp(max=0)
        y = Interval(pos * y.lo + neg * y.hi, pos * y.hi + neg * y.lo)
    if bias is not None:
        y = Interval(y.lo + bias, y.hi + bias)
    return y


FRESH_OUTPUTS.update({"layer_norm"})
