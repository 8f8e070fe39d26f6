"""Backward rule of max pooling.

Per window, i* is the entry with the largest lower bound.  Lower bound: max >= x_{i*}.
Upper bound: when l_{i*} >= u_j for every other entry j the max *is* x_{i*}; otherwise the
constant max_j u_j (the relaxation auto_LiRPA's CROWN uses without optimised slopes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harden.bounds.backward import Back, backward_rule, flat_sum
from harden.bounds.interval import Interval
from harden.bounds.pooling import _MAX, _pair, _stride
from harden.bounds.rules import Call, concrete_arg, interval_arg


def _windows(t: torch.Tensor, g: dict, fill: float) -> torch.Tensor:
    """[N, C, K, L]: the K entries of each of the L windows, padding filled with ``fill``
    (``g["extra"]``: more padding at the bottom and right, where ceil_mode lets windows hang over)."""
    n, c = t.shape[:2]
    pad, extra = _pair(g["padding"]), g.get("extra", (0, 0))
    if any(pad) or any(extra):
        t = F.pad(t, (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0]), value=fill)
    cols = F.unfold(t.reshape(n * c, 1, *t.shape[2:]), g["kernel_size"], dilation=g["dilation"], stride=g["stride"])
    return cols.reshape(n, c, cols.shape[1], cols.shape[2])


def _geometry(call: Call) -> tuple[Interval, dict]:
    p = call.bind(_MAX, lambda m: {k: getattr(m, k) for k in
                                   ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")})
    x = interval_arg(call, p["input"], "the input")
    if p["return_indices"] or x.dim() != 4:
        raise call.fail("max pooling has a backward rule only for 4-d inputs without return_indices")
    g = dict(kernel_size=_pair(concrete_arg(call, p["kernel_size"], "kernel_size")), stride=_pair(_stride(p)),
             padding=_pair(p["padding"]), dilation=_pair(p["dilation"]))
    if p["ceil_mode"]:
        out = F.max_pool2d(x.lo[:1], ceil_mode=True, **g).shape[2:]
        g["extra"] = tuple(max(0, (o - 1) * s + d * (k - 1) + 1 - (size + 2 * q))
                           for o, s, d, k, size, q in zip(out, g["stride"], g["dilation"], g["kernel_size"],
                                                          x.shape[2:], g["padding"]))
    return x, g


def _relaxation(x: Interval, g: dict):
    """(flat input index of i* [N, C, L], stable [N, C, L] bool, max upper bound [N, C, L])."""
    lower = _windows(x.lo, g, float("-inf"))
    upper = _windows(x.hi, g, float("-inf"))
    best, pick = lower.max(dim=2, keepdim=True)                              # [N, C, 1, L]
    others = upper.scatter(2, pick, float("-inf")).amax(dim=2)
    stable = best.squeeze(2) >= others
    top = upper.amax(dim=2)
    h, w = x.shape[2:]
    positions = torch.arange(h * w, device=x.device, dtype=torch.float64).reshape(1, 1, h, w)
    where = _windows(positions, g, -1.0)[0, 0]                               # [K, L] input position of each entry
    index = where.long().gather(0, pick.reshape(-1, pick.shape[-1])).reshape(pick.shape[0], pick.shape[1], -1)
    return index, stable, top


def entries_read(x: Interval, g: dict) -> torch.Tensor:
    """bool [N, C, H, W]: the entries whose bounds the relaxation of some window can depend on.

    An entry j with u_j < max_i l_i in every window holding it is never the picked entry (the one with
    the largest lower bound) and never the window's largest upper bound, so neither its bounds nor
    the relaxation of what produces it change any bound after the pool; tightening its bounds (which
    keeps u_j <= its current value and only raises the others' l_i) keeps it that way.
    """
    n, c, h, w = x.shape
    lower = _windows(x.lo, g, float("-inf"))
    upper = _windows(x.hi, g, float("-inf"))
    best = lower.amax(dim=2, keepdim=True)                                   # [N, C, 1, L]
    read = (upper >= best).to(x.lo.dtype)                                   # [N, C, K, L]
    positions = torch.arange(h * w, device=x.device, dtype=torch.float64).reshape(1, 1, h, w)
    where = _windows(positions, g, -1.0)[0, 0].long()                       # [K, L]
    inside = where >= 0
    index = torch.where(inside, where, torch.full_like(where, h * w))       # padding -> a spare slot
    counts = torch.zeros((n, c, h * w + 1), dtype=x.lo.dtype, device=x.device)
    counts.scatter_add_(2, index.reshape(1, 1, -1).expand(n, c, -1), read.reshape(n, c, -1))
    return counts[:, :, :h * w].reshape(n, c, h, w) > 0


@backward_rule("max_pool2d", relaxes=lambda x: torch.ones_like(x.lo, dtype=torch.bool))
def max_pool2d(back: Back) -> None:
    """max >= x_{i*}; max <= x_{i*} where i* dominates its window, else max <= max_j u_j."""
    x, g = _geometry(back.call)
    index, stable, top = back.remember(f"max_pool2d{sorted(g.items())}", x, lambda: _relaxation(x, g))
    n, c = x.shape[:2]
    A = back.A.reshape(back.A.shape[0], c, -1)                               # [R, C, L]
    if A.shape[2] != index.shape[2]:
        raise back.call.fail("pooling windows do not match the output (unsupported geometry)")
    stable_r = back.per_row(stable)
    neg = A.clamp(max=0)
    on_pick = A.clamp(min=0) + torch.where(stable_r, neg, torch.zeros_like(neg))
    coefficients = torch.zeros((A.shape[0], c, x.shape[2] * x.shape[3]), dtype=A.dtype, device=A.device)
    coefficients.scatter_add_(2, back.per_row(index), on_pick)
    back.emit(x, coefficients.reshape((A.shape[0],) + tuple(x.shape[1:])))
    # (neg < 0 also keeps 0 * inf from an unbounded window out of the bias)
    constant = torch.where(~stable_r & (neg < 0), neg * back.per_row(top), torch.zeros_like(neg))
    back.add_bias(flat_sum(constant))
