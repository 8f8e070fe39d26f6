"""A sound relaxation of the flow's total-variation budget, applied to the first affine layer.

Per pixel the TV budget restricts nothing (a constant flow has TV 0, so every pixel still reaches its whole
|r| <= delta range, :mod:`harden.bounds.flow_box`); what it restricts is how many pixels may stray far from
a common translation.  This module turns that into bounds on the first linear / convolution layer.

**How many pixels may stray.**  Take one flow component u and t its median (at most half the pixels lie
above it, at most half below).  The discrete coarea formula says that the sum over 4-neighbour edges of
|u_p - u_q| equals the integral over levels l of the edge boundary of {u > l}.  For l in (t, t + s] that set
holds {u > t + s} and lies inside {u > t}, so it has at most half the pixels and at least A+ = |{u > t + s}|
of them; on an H x W grid such a set has an edge boundary of at least iso(A) = min(ceil(2 sqrt(A)), min(H, W))
(proof: :func:`iso`).  The levels below t give the same for A- = |{u < t - s}|, so

    s * (iso(A+) + iso(A-)) <= sum_edges |u_p - u_q| <= TV / 2        (Eq. 6 counts every edge twice)

and, both components together, the two sides' sums add up to at most TV / sqrt(2) (|a| + |b| <= sqrt(2)
sqrt(a^2 + b^2)).  :func:`stray_counts` turns this into K(s): at most K(s) pixels have a flow farther than s
(in either component) from the translation t = (median u, median v), which itself lies in [-delta, delta]^2.

**First-layer bounds.**  Split the translations into cells T.  For a flow whose translation lies in T, a
pixel at level k (stray at most s_k) reads offsets in T grown by s_k (clipped to the delta box); the top
level is the whole delta box; at most K(s_k) pixels sit above level k.  A neuron sum_p w_p x_p then has, per
pixel, a least value m_p(k) at each level (non-increasing in k), and for every admissible assignment

    sum_p m_p(level_p) >= sum_p m_p(0) - sum_k (sum of the K(s_k) largest m_p(k) - m_p(k + 1))

(each pixel above level k pays m_p(k) - m_p(k+1) >= 0 and at most K(s_k) pixels do).  The neuron's lower
bound is the least of these over the cells (its own cell for each neuron: sound, if looser than branching
per sample); the upper bound is the mirror image.  Both are intersected with the interval bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.flow_box import pixel_range
from harden.bounds.interval import Interval
from harden.bounds.linear import CONV_SIGNATURE, LINEAR_SIGNATURE, _conv_module, _linear_module, explicit_padding
from harden.bounds.rules import Call
from harden.graph.ops import canonical_op

LEVELS = (0.25, 0.5)
"""Default stray levels, as fractions of delta (the top level is the whole delta box)."""
CELLS = 4
"""Default translation cells per axis (CELLS^2 cells over [-delta, delta]^2)."""


# ---------------------------------------------------------------------------------------------- counting
def iso(area: int, h: int, w: int) -> int:
    """Least edge boundary (4-neighbour edges inside an h x w grid) of a set of ``area`` <= h w / 2 pixels.

    Proof: if no row and no column is full, every occupied row and column holds a boundary edge of its own
    direction, so the boundary is at least R + C >= 2 sqrt(R C) >= 2 sqrt(area).  A full row (and no full
    column) makes every column occupied and not full: at least w edges; a full column alone: at least h.
    Both: the complement (at least half the grid) lies in the a x b block of non-full rows and columns, so
    a b >= h w / 2, a >= h / 2, b >= w / 2 and the boundary is at least a + b >= min(h, w).
    The boundary is an integer, hence ceil(2 sqrt(area)).
    """
    if area <= 0:
        return 0
    return min(math.isqrt(4 * area - 1) + 1, min(h, w))


def _max_area(cost: int, h: int, w: int) -> int:
    """The largest set (at most half the grid) whose boundary bound iso() is at most ``cost``."""
    half = (h * w) // 2
    if cost >= min(h, w):
        return half
    return min(half, cost * cost // 4)


def _one_component(budget: int, h: int, w: int) -> list[int]:
    """best[b] = most pixels above plus below the median whose iso() costs sum to at most b."""
    areas = [_max_area(c, h, w) for c in range(budget + 1)]
    return [min(h * w, max(areas[c] + areas[b - c] for c in range(b + 1))) for b in range(budget + 1)]


def stray_counts(levels: list[float], tv: float, h: int, w: int) -> list[int]:
    """K(s) per level s > 0: at most this many pixels have a flow farther than s from the median translation."""
    out = []
    for s in levels:
        if not s > 0:
            raise ValueError(f"stray levels must be > 0; got {s}")
        # Costs are integers: a real budget b admits every integer cost <= floor(b) (a hair up against rounding).
        single = math.floor(tv / (2 * s) + 1e-9)
        joint = math.floor(tv / (math.sqrt(2) * s) + 1e-9)
        single = min(single, joint, 4 * min(h, w))   # four sets of cost min(h, w) already reach every pixel
        best = _one_component(single, h, w)
        total = max(best[bu] + best[min(single, max(0, joint - bu))] for bu in range(single + 1))
        out.append(min(h * w, total))
    return out


# ---------------------------------------------------------------------------------------------- the layer
@dataclass
class FirstAffine:
    """A linear or conv2d node reading the (flattened) input directly, with its weights and geometry."""

    node: str
    kind: str                      # "linear" | "conv2d"
    weight: torch.Tensor
    bias: torch.Tensor | None
    geometry: dict                 # conv2d: stride, padding, dilation


def _concrete(gm: fx.GraphModule, value):
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            raise LookupError
        target = gm
        for part in value.target.split("."):
            target = getattr(target, part)
        return target
    return value


def first_affine_layers(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[FirstAffine]:
    """Every linear node fed by the input through flatten / reshape only (checked to be the plain C-order
    flatten on a probe) and every conv2d node (one group, zero padding) fed by the input itself."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found = []
    for node in gm.graph.nodes:
        key = canonical_op(gm, node)
        if key not in ("linear", "conv2d") or not node.args:
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        chain = []
        while isinstance(source, fx.Node) and source is not placeholder and \
                canonical_op(gm, source) in ("flatten", "reshape") and key == "linear":
            chain.append(source)
            source = source.args[0] if source.args else None
        if source is not placeholder:
            continue
        if key == "conv2d" and chain:
            continue
        try:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            args = tuple(_concrete(gm, a) if i else None for i, a in enumerate(node.args))
            kwargs = {k: _concrete(gm, v) for k, v in node.kwargs.items() if k != "input"}
        except (LookupError, AttributeError):
            continue
        call = Call(gm, node, key, args, kwargs, module)
        if key == "linear":
            p = call.bind(LINEAR_SIGNATURE, _linear_module)
            weight = p["weight"].detach()
            if weight.dim() != 2 or weight.shape[1] != math.prod(input_shape):
                continue
            if chain and not _flattens_plainly(gm, chain[0], input_shape):
                continue
            found.append(FirstAffine(node.name, key, weight, _detached(p["bias"]), {}))
        else:
            p = call.bind(CONV_SIGNATURE, _conv_module)
            p = explicit_padding(p, p["weight"])
            if p.get("pre_pad") is not None or p["groups"] != 1:
                continue
            found.append(FirstAffine(node.name, key, p["weight"].detach(), _detached(p["bias"]),
                                     {"stride": p["stride"], "padding": p["padding"], "dilation": p["dilation"]}))
    return found


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _flattens_plainly(gm: fx.GraphModule, last: fx.Node, input_shape: tuple[int, ...]) -> bool:
    from harden.bounds.propagate import run_recorded

    probe = torch.arange(2 * math.prod(input_shape), dtype=torch.float32).reshape((2,) + tuple(input_shape))
    try:
        _, values = run_recorded(gm, probe, {last.name})
    except Exception:
        return False
    value = values.get(last.name)
    return isinstance(value, torch.Tensor) and value.shape == (2, probe[0].numel()) and \
        torch.equal(value, probe.reshape(2, -1))


# ---------------------------------------------------------------------------------------------- bounds
def _pixel_terms(layer: FirstAffine, centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron and pixel, the least and the largest value of w . x_p over the box [c - r, c + r] of one
    pixel's channels: [N, J, P] for linear (J neurons, P pixels), [N, O, kk, Q] for conv2d (kk window
    pixels, Q positions)."""
    n, c = centre.shape[:2]
    if layer.kind == "linear":
        w = layer.weight.to(centre.dtype).reshape(layer.weight.shape[0], c, -1)             # [J, C, P]
        mid = torch.einsum("jcp,ncp->njp", w, centre.reshape(n, c, -1))
        spread = torch.einsum("jcp,ncp->njp", w.abs(), radius.reshape(n, c, -1))
    else:
        w = layer.weight.to(centre.dtype)
        o, _, kh, kw = w.shape
        g = layer.geometry
        unfold = lambda t: F.unfold(t, (kh, kw), dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
        cu = unfold(centre).reshape(n, c, kh * kw, -1)                                     # [N, C, kk, Q]
        ru = unfold(radius).reshape(n, c, kh * kw, -1)
        wf = w.reshape(o, c, kh * kw)
        mid = torch.einsum("ock,nckq->nokq", wf, cu)
        spread = torch.einsum("ock,nckq->nokq", wf.abs(), ru)
    return mid - spread, mid + spread


def _top_sum(gains: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    if k <= 0:
        return gains.sum(dim) * 0
    if k >= gains.shape[dim]:
        return gains.sum(dim)
    return gains.topk(k, dim=dim).values.sum(dim)


def _output_shape(layer: FirstAffine, lower: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    if layer.kind == "linear":
        out = lower
        bias = layer.bias
        return out + bias.to(out.dtype) if bias is not None else out
    n, o = lower.shape[:2]
    h, w = input_shape[1:]
    g = layer.geometry
    kh, kw = layer.weight.shape[2:]

    def size(length, k, i):
        pad = g["padding"][i] if isinstance(g["padding"], (tuple, list)) else g["padding"]
        dil = g["dilation"][i] if isinstance(g["dilation"], (tuple, list)) else g["dilation"]
        stride = g["stride"][i] if isinstance(g["stride"], (tuple, list)) else g["stride"]
        return (length + 2 * pad - dil * (k - 1) - 1) // stride + 1

    out = lower.reshape(n, o, size(h, kh, 0), size(w, kw, 1))
    return out + layer.bias.to(out.dtype).view(1, -1, 1, 1) if layer.bias is not None else out


def layer_bounds(layer: FirstAffine, x: torch.Tensor, delta: float, tv: float, *, cells: int = CELLS,
                 levels: tuple[float, ...] = LEVELS) -> Interval | None:
    """Bounds of the layer's output over every flow with |r| <= delta and TV(r) <= tv (None: nothing gained)."""
    h, w = x.shape[2:]
    strays = [s * delta for s in levels]
    counts = stray_counts(strays, tv, h, w)
    kept = [(s, k) for s, k in zip(strays, counts) if k < h * w]
    if not kept or delta == 0:
        return None
    strays, counts = [s for s, _ in kept], [k for _, k in kept]
    full = pixel_range(x, (-delta, delta), (-delta, delta))
    top_lo, top_hi = _pixel_terms(layer, full.centre, full.radius)
    edges = [-delta + 2 * delta * i / cells for i in range(cells + 1)]
    pixel_dim = 2
    lower = upper = None
    for i in range(cells):
        for j in range(cells):
            terms = []
            for s in strays:
                rows = (max(-delta, edges[i] - s), min(delta, edges[i + 1] + s))
                cols = (max(-delta, edges[j] - s), min(delta, edges[j + 1] + s))
                box = pixel_range(x, rows, cols)
                terms.append(_pixel_terms(layer, box.centre, box.radius))
            terms.append((top_lo, top_hi))
            lo = terms[0][0].sum(pixel_dim)
            hi = terms[0][1].sum(pixel_dim)
            for k, count in enumerate(counts):
                lo = lo - _top_sum((terms[k][0] - terms[k + 1][0]).clamp_min(0), count, pixel_dim)
                hi = hi + _top_sum((terms[k + 1][1] - terms[k][1]).clamp_min(0), count, pixel_dim)
            lower = lo if lower is None else torch.minimum(lower, lo)
            upper = hi if upper is None else torch.maximum(upper, hi)
    shape = tuple(x.shape[1:])
    return Interval(_output_shape(layer, lower, shape), _output_shape(layer, upper, shape))


def tv_clamps(gm: fx.GraphModule, x: torch.Tensor, delta: float, tv: float, *, cells: int = CELLS,
              levels: tuple[float, ...] = LEVELS, layers: list[FirstAffine] | None = None
              ) -> dict[str, Callable[[Interval], Interval]]:
    """Clamps intersecting each first affine layer's interval with its TV-relaxation bounds."""
    clamps = {}
    for layer in layers if layers is not None else first_affine_layers(gm, tuple(x.shape[1:])):
        bounds = layer_bounds(layer, x, delta, tv, cells=cells, levels=levels)
        if bounds is None:
            continue

        def clamp(iv: Interval, b=bounds) -> Interval:
            return Interval(torch.maximum(iv.lo, b.lo.to(iv.lo.dtype)), torch.minimum(iv.hi, b.hi.to(iv.hi.dtype)))

        clamps[layer.node] = clamp
    return clamps
