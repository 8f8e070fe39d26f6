"""Batch norm in eval mode is a per-channel affine map a x + c; its bound is sign-aware in a."""

from __future__ import annotations

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
