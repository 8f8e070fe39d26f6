"""Pooling: max and average pooling are monotone in every input, so they pool the lower and the upper bounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, FRESH_OUTPUTS, REQUIRED, Call, concrete_arg, interval_arg

_MAX = (
    ("input", REQUIRED), ("kernel_size", REQUIRED), ("stride", None), ("padding", 0), ("dilation", 1),
    ("ceil_mode", False), ("return_indices", False),
)
_AVG = (
    ("input", REQUIRED), ("kernel_size", REQUIRED), ("stride", None), ("padding", 0), ("ceil_mode", False),
    ("count_include_pad", True), ("divisor_override", None),
)
_ADAPTIVE = (("input", REQUIRED), ("output_size", REQUIRED))


def _stride(p: dict):
    # F.* default stride None, ATen default []: both mean "the kernel size".
    stride = p["stride"]
    return p["kernel_size"] if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else stride


@BOUND_RULES.register("max_pool2d")
def max_pool2d(call: Call) -> Interval:
    """max over a window is monotone: [maxpool(l), maxpool(u)]."""
    p = call.bind(_MAX, lambda m: {k: getattr(m, k) for k in
                                   ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")})
    x = interval_arg(call, p["input"], "the input")
    if p["return_indices"]:
        raise call.fail("max pooling with return_indices=True has no interval meaning for the indices")
    geometry = dict(kernel_size=concrete_arg(call, p["kernel_size"], "kernel_size"), stride=_stride(p),
                    padding=p["padding"], dilation=p["dilation"], ceil_mode=p["ceil_mode"])
    tiles = _tiling(x, geometry)
    if tiles is not None:
        return x.map_channelwise(lambda t: _tile_max(t, tiles))
    return x.map_channelwise(lambda t: F.max_pool2d(t, **geometry))


def _pair(v):
    v = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    return v * 2 if len(v) == 1 else v


def _tiling(x: Interval, g: dict) -> tuple[int, int] | None:
    """(kh, kw) when the pooling windows tile the input exactly (stride = kernel, no padding or dilation)."""
    if x.dim() != 4:
        return None
    kernel, stride = _pair(g["kernel_size"]), _pair(g["stride"])
    h, w = x.shape[-2:]
    if (kernel != stride or kernel == (1, 1) or _pair(g["padding"]) != (0, 0) or _pair(g["dilation"]) != (1, 1)
            or h % kernel[0] or w % kernel[1]):
        return None  # (a 1x1 window would give back a view of the input: the rule must return fresh bounds)
    return kernel


def _tile_max(t, kernel: tuple[int, int]):
    """max_pool2d over exactly tiling windows: element-wise maxima of strided views, first along the
    width then along the height (no index tensor, several times faster than max_pool2d on CPU)."""
    kh, kw = kernel
    n, c, h, w = t.shape
    rows = t.reshape(n, c, h, w // kw, kw)
    out = rows[..., 0]
    for j in range(1, kw):
        out = torch.maximum(out, rows[..., j])
    cols = out.reshape(n, c, h // kh, kh, w // kw)
    res = cols[:, :, :, 0]
    for i in range(1, kh):
        res = torch.maximum(res, cols[:, :, :, i])
    return res if kh > 1 else res.contiguous()  # kw > 1 here: ``res`` views the fresh ``out``


@BOUND_RULES.register("avg_pool2d")
def avg_pool2d(call: Call) -> Interval:
    """average with non-negative weights is monotone: [avgpool(l), avgpool(u)]."""
    p = call.bind(_AVG, lambda m: {k: getattr(m, k) for k in
                                   ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                    "divisor_override")})
    x = interval_arg(call, p["input"], "the input")
    geometry = dict(kernel_size=p["kernel_size"], stride=_stride(p), padding=p["padding"], ceil_mode=p["ceil_mode"],
                    count_include_pad=p["count_include_pad"], divisor_override=p["divisor_override"])
    return x.map_channelwise(lambda t: F.avg_pool2d(t, **geometry))


@BOUND_RULES.register("adaptive_avg_pool2d")
def adaptive_avg_pool2d(call: Call) -> Interval:
    """adaptive average is monotone: [adaptive_avg(l), adaptive_avg(u)]."""
    p = call.bind(_ADAPTIVE, lambda m: {"output_size": m.output_size})
    x = interval_arg(call, p["input"], "the input")
    return x.map_channelwise(lambda t: F.adaptive_avg_pool2d(t, p["output_size"]))


@BOUND_RULES.register("adaptive_max_pool2d")
def adaptive_max_pool2d(call: Call):
    """adaptive max is monotone: [adaptive_max(l), adaptive_max(u)] (ATen's indices: None, no bounds)."""
    # the indices differ across the box: a graph that reads them fails there
    p = call.bind((("input", REQUIRED), ("output_size", REQUIRED), ("return_indices", False)),
                  lambda m: {"output_size": m.output_size, "return_indices": m.return_indices})
    x = interval_arg(call, p["input"], "the input")
    out = x.map_channelwise(lambda t: F.adaptive_max_pool2d(t, p["output_size"]))
    if p["return_indices"] or call.target is torch.ops.aten.adaptive_max_pool2d.default:
        return (out, None)
    return out


FRESH_OUTPUTS.update({"max_pool2d", "avg_pool2d"})
