"""Affine layers by centre and radius: W x + b over [c - r, c + r] lies in [W c + b - |W| r, W c + b + |W| r]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.errors import HardenError
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


def explicit_padding(p: dict, weight: torch.Tensor) -> dict:
    """``padding="valid"`` / ``"same"`` as numbers: the backward rules and windows need explicit geometry.

    "same" pads dilation (k - 1) per dim, the extra entry (even kernels) at the end, as torch does; an
    uneven split becomes a zero ``pre_pad`` (the input padded first, then convolved without padding)."""
    padding = p.get("padding")
    if not isinstance(padding, str):
        return p
    spatial = weight.dim() - 2
    if padding == "valid":
        return {**p, "padding": 0}
    if padding != "same":
        raise HardenError(f"convolution padding {padding!r} is not 'same' or 'valid'")
    dilation = p["dilation"] if isinstance(p["dilation"], (list, tuple)) else (p["dilation"],) * spatial
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if all(t % 2 == 0 for t in totals):
        return {**p, "padding": tuple(t // 2 for t in totals)}
    pads = []
    for t in reversed(totals):    # F.pad lists the last dim first
        pads += [t // 2, t - t // 2]
    return {**p, "padding": 0, "pre_pad": (tuple(pads), "constant")}


def _conv(call: Call, conv, spatial: int) -> Interval:
    p = call.bind(CONV_SIGNATURE, _conv_module)
    x = interval_arg(call, p["input"], "the input")
    weight = concrete_arg(call, p["weight"], "weight")
    p = explicit_padding(p, weight)
    bias = concrete_arg(call, p["bias"], "bias")
    groups = p["groups"]
    half = weight * 0.5
    if x.dim() != spatial + 2:  # an unbatched input: two plain convolutions
        geometry = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=groups)
        return _from_sums(conv(_pre_pad(x.hi + x.lo, p), half, bias, **geometry),
                          conv(_pre_pad(x.hi - x.lo, p), half.abs(), None, **geometry))
    # One grouped convolution computes both: channels [u + l, u - l] meet [W / 2, |W| / 2] (2 x groups),
    # so the centre and the radius come out of one call, side by side in one buffer.
    sums = _sums(x)
    both = conv(_pre_pad(sums, p), torch.cat([half, half.abs()]),
                None if bias is None else torch.cat([bias, torch.zeros_like(bias)]),
                stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=2 * groups)
    out = weight.shape[0]
    if both.requires_grad:
        return _from_sums(both[:, :out], both[:, out:])
    both[:, :out].add_(both[:, out:])                                      # c + r
    torch.sub(both[:, :out], both[:, out:], alpha=2, out=both[:, out:])    # (c + r) - 2 r
    return Interval.from_joint(both)


def _sums(x: Interval) -> torch.Tensor:
    """[u + l, u - l] concatenated along the channels (written in place of a cat when autograd is off).

    Images go channels-last: oneDNN's grouped convolution is several times faster on that layout.
    """
    layout = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    if x.lo.requires_grad or x.hi.requires_grad:
        return torch.cat([x.hi + x.lo, x.hi - x.lo], dim=1).contiguous(memory_format=layout)
    c = x.shape[1]
    sums = torch.empty((x.shape[0], 2 * c) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=layout)
    torch.add(x.hi, x.lo, out=sums[:, :c])
    torch.sub(x.hi, x.lo, out=sums[:, c:])
    return sums


def _pre_pad(t: torch.Tensor, p: dict) -> torch.Tensor:
    """Reflect / replicate / circular padding copies values: pad the centre and the radius alike."""
    if p.get("pre_pad") is None:
        return t
    pads, mode = p["pre_pad"]
    return F.pad(t, pads, mode=mode)


@BOUND_RULES.register("conv2d")
def conv2d(call: Call) -> Interval:
    """y = W * x + b (2-d convolution): centre W * c + b, radius |W| * r."""
    return _conv(call, F.conv2d, 2)


@BOUND_RULES.register("conv1d")
def conv1d(call: Call) -> Interval:
    """y = W * x + b (1-d convolution): centre W * c + b, radius |W| * r."""
    return _conv(call, F.conv1d, 1)


FRESH_OUTPUTS.update({"linear", "conv1d", "conv2d"})
