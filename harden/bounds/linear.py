"""Affine layers by centre and radius: W x + b over [c - r, c + r] lies in [W c + b - |W| r, W c + b + |W| r]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, FRESH_OUTPUTS, REQUIRED, Call, concrete_arg, interval_arg

LINEAR_SIGNATURE = (("input", REQUIRED), ("weight", REQUIRED), ("bias", None))


def _linear_module(m) -> dict:
    return {"weight": m.weight, "bias": m.bias}


def linear_parts(call: Call) -> tuple[Interval, torch.Tensor, torch.Tensor | None]:
    """(input bounds, weight, bias) of a linear node in any spelling (certify folds the label margin into it)."""
    p = call.bind(LINEAR_SIGNATURE, _linear_module)
    x = interval_arg(call, p["input"], "the input")
    return x, concrete_arg(call, p["weight"], "weight"), concrete_arg(call, p["bias"], "bias")


def _from_sums(centre: torch.Tensor, radius: torch.Tensor) -> Interval:
    """[c - r, c + r] from fresh c and r; without autograd both results are written over c and r."""
    if centre.requires_grad or radius.requires_grad:
        return Interval(centre - radius, centre + radius)
    hi = centre.add_(radius)
    return Interval(torch.sub(hi, radius, alpha=2, out=radius), hi)  # (c + r) - 2 r


@BOUND_RULES.register("linear")
def linear(call: Call) -> Interval:
    """y = W x + b: centre W c + b, radius |W| r."""
    x, weight, bias = linear_parts(call)
    # (u + l) and (u - l) meet W / 2 and |W| / 2: halving is exact in floating point and saves two passes.
    half = weight * 0.5
    return _from_sums(F.linear(x.hi + x.lo, half, bias), F.linear(x.hi - x.lo, half.abs()))


CONV_SIGNATURE = (
    ("input", REQUIRED), ("weight", REQUIRED), ("bias", None), ("stride", 1), ("padding", 0),
    ("dilation", 1), ("groups", 1),
)


def _conv_module(m) -> dict:
    params = {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
              "dilation": m.dilation, "groups": m.groups}
    if m.padding_mode != "zeros":
        # nn.ConvNd pads with the mode first, then convolves without padding.
        params["padding"] = 0
        params["pre_pad"] = (m._reversed_padding_repeated_twice, m.padding_mode)
    return params


def _conv(call: Call, conv) -> Interval:
    p = call.bind(CONV_SIGNATURE, _conv_module)
    x = interval_arg(call, p["input"], "the input")
    weight = concrete_arg(call, p["weight"], "weight")
    bias = concrete_arg(call, p["bias"], "bias")
    twice_centre, twice_radius = x.hi + x.lo, x.hi - x.lo
    pre_pad = p.get("pre_pad")
    if pre_pad is not None:
        # Reflect / replicate / circular padding copies values: pad the centre and the radius alike.
        pads, mode = pre_pad
        twice_centre, twice_radius = F.pad(twice_centre, pads, mode=mode), F.pad(twice_radius, pads, mode=mode)
    geometry = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])
    half = weight * 0.5
    return _from_sums(conv(twice_centre, half, bias, **geometry), conv(twice_radius, half.abs(), None, **geometry))


@BOUND_RULES.register("conv2d")
def conv2d(call: Call) -> Interval:
    """y = W * x + b (2-d convolution): centre W * c + b, radius |W| * r."""
    return _conv(call, F.conv2d)


@BOUND_RULES.register("conv1d")
def conv1d(call: Call) -> Interval:
    """y = W * x + b (1-d convolution): centre W * c + b, radius |W| * r."""
    return _conv(call, F.conv1d)


FRESH_OUTPUTS.update({"linear", "conv1d", "conv2d"})
