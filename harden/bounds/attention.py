"""Products of two input-dependent tensors: matmul, scaled-dot-product attention, nn.MultiheadAttention.

A product of intervals by centre and radius: for A in [Ac - Ar, Ac + Ar] and B in [Bc - Br, Bc + Br],
A B - Ac Bc = Ac (B - Bc) + (A - Ac) Bc + (A - Ac)(B - Bc), so |A B - Ac Bc| <= |Ac| Br + Ar |Bc| + Ar Br
entry-wise (every term of every sum bounded by its absolute value).  Attention is then softmax bounds
(:mod:`harden.bounds.activations`) between two such products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harden.bounds.activations import _log_softmax_bounds
from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, REQUIRED, Call, concrete_arg

aten = torch.ops.aten


def _centre_radius(v) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(v, Interval):
        return (v.hi + v.lo) * 0.5, (v.hi - v.lo) * 0.5
    return v, None


def interval_matmul(a, b) -> Interval:
    """a @ b with either or both an Interval: centre Ac Bc, radius |Ac| Br + Ar |Bc| + Ar Br."""
    ac, ar = _centre_radius(a)
    bc, br = _centre_radius(b)
    centre = torch.matmul(ac, bc)
    radius = torch.zeros_like(centre)
    if br is not None:
        radius = radius + torch.matmul(ac.abs(), br)
    if ar is not None:
        radius = radius + torch.matmul(ar, bc.abs())
    if ar is not None and br is not None:
        radius = radius + torch.matmul(ar, br)
    return Interval(centre - radius, centre + radius)


@BOUND_RULES.register("matmul")
def matmul(call: Call) -> Interval:
    """a @ b (matmul, bmm, operator @): centre and radius of the interval product."""
    p = call.bind((("input", REQUIRED), ("other", REQUIRED)))
    return interval_matmul(p["input"], p["other"])


def _scores_mask(mask, is_causal: bool, length_q: int, length_k: int, like: torch.Tensor):
    """(additive float mask or None) from attn_mask (bool: True = attend; float: added) and is_causal."""
    add = None
    if is_causal:
        keep = torch.ones(length_q, length_k, dtype=torch.bool, device=like.device).tril()
        add = torch.zeros(length_q, length_k, dtype=like.dtype, device=like.device).masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            extra = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))
        else:
            extra = mask.to(like.dtype)
        add = extra if add is None else add + extra
    return add


def attention_bounds(q, k, v, mask=None, is_causal: bool = False,
                     scale: float | None = None) -> tuple[Interval, Interval]:
    """(softmax(q k^T scale + mask) v, the softmax weights) over intervals (any of q, k, v may be constant)."""
    qc = q.lo if isinstance(q, Interval) else q
    e = qc.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    kt = Interval(k.lo.transpose(-2, -1), k.hi.transpose(-2, -1)) if isinstance(k, Interval) else k.transpose(-2, -1)
    scores = interval_matmul(q, kt)
    scores = Interval(scores.lo * scale, scores.hi * scale) if scale >= 0 else Interval(scores.hi * scale,
                                                                                         scores.lo * scale)
    add = _scores_mask(mask, is_causal, scores.lo.shape[-2], scores.lo.shape[-1], scores.lo)
    if add is not None:
        scores = Interval(scores.lo + add, scores.hi + add)
    weights = _log_softmax_bounds(scores, -1).map(torch.exp)
    return interval_matmul(weights, v), weights


_SDPA = (("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))


@BOUND_RULES.register("scaled_dot_product_attention")
def scaled_dot_product_attention(call: Call) -> Interval:
    """softmax(q k^T / sqrt(E) + mask) v: interval products around the softmax's bounds."""
    p = call.bind(_SDPA)
    if float(p["dropout_p"]) != 0.0:
        raise call.fail("attention dropout must be 0 (eval mode) to be bounded")
    if p["enable_gqa"]:
        raise call.fail("grouped-query attention (enable_gqa=True) has no bound rule")
    mask = concrete_arg(call, p["attn_mask"], "attn_mask")
    return attention_bounds(p["query"], p["key"], p["value"], mask, bool(p["is_causal"]), p["scale"])[0]


_MHA = (("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED), ("key_padding_mask", None),
        ("need_weights", True), ("attn_mask", None), ("average_attn_weights", True), ("is_causal", False))


def _project(x, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
    c, r = _centre_radius(x)
    centre = F.linear(c, weight, bias)
    return Interval(centre - F.linear(r, weight.abs()), centre + F.linear(r, weight.abs())) if r is not None \
        else Interval(centre, centre)


def _heads(x: Interval, heads: int) -> Interval:
    """[N, L, E] -> [N, heads, L, E / heads]."""
    n, length, e = x.lo.shape
    return x.map(lambda t: t.reshape(n, length, heads, e // heads).transpose(1, 2))


@BOUND_RULES.register("multi_head_attention")
def multi_head_attention(call: Call):
    """nn.MultiheadAttention: projections by centre and radius, per-head attention, output projection."""
    # returns (output, weights averaged over heads or per head, or None when need_weights=False), as the module
    m = call.module
    if m is None:
        raise call.fail("multi-head attention is bounded as an nn.MultiheadAttention module only")
    p = call.bind(_MHA, lambda _: {})
    if m.training and m.dropout > 0:
        raise call.fail("attention dropout in training mode cannot be bounded; put the model in eval mode")
    if p["key_padding_mask"] is not None or m.bias_k is not None or m.add_zero_attn:
        raise call.fail("key padding masks, bias_k/bias_v and add_zero_attn have no bound rule")
    query, key, value = p["query"], p["key"], p["value"]
    if not m.batch_first:   # [L, N, E] -> [N, L, E]
        query, key, value = (v.map(lambda t: t.transpose(0, 1)) if isinstance(v, Interval) else v.transpose(0, 1)
                             for v in (query, key, value))
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight[:e], m.in_proj_weight[e:2 * e], m.in_proj_weight[2 * e:]
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.split(e)
    q, k, v = (_heads(_project(x, w, b), m.num_heads) for x, w, b in
               ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    mask = concrete_arg(call, p["attn_mask"], "attn_mask")
    out, weights = attention_bounds(q, k, v, mask, bool(p["is_causal"]))
    n, heads, length, d = out.lo.shape
    out = out.map(lambda t: t.transpose(1, 2).reshape(n, length, heads * d))
    out = _project(out, m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = out.map(lambda t: t.transpose(0, 1))
    if not p["need_weights"]:
        return (out, None)
    if p["average_attn_weights"]:   # a mean of bounds bounds the mean
        weights = weights.map(lambda t: t.mean(dim=1))
    return (out, weights)
