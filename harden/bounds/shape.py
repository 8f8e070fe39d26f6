"""Shape operations move values without changing them: apply the same move to both end points."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, REQUIRED, Call, concrete_arg, interval_arg, replay

aten = torch.ops.aten


@BOUND_RULES.register("flatten")
def flatten(call: Call) -> Interval:
    """flatten(x) element-wise: [flatten(l), flatten(u)]."""
    p = call.bind((("input", REQUIRED), ("start_dim", 0), ("end_dim", -1)),
                  lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim})
    x = interval_arg(call, p["input"], "the input")
    return x.map(lambda t: torch.flatten(t, p["start_dim"], p["end_dim"]))


@BOUND_RULES.register("reshape")
def reshape(call: Call) -> Interval:
    """reshape / view: [reshape(l), reshape(u)]."""
    p = call.bind((("input", REQUIRED), ("*shape", REQUIRED)))
    x = interval_arg(call, p["input"], "the input")
    shape = concrete_arg(call, p["shape"], "the shape")
    if any(not isinstance(s, (int, torch.SymInt)) for s in shape):
        raise call.fail(f"view/reshape to {shape!r} is not a reshape to a shape")
    return x.map(lambda t: t.reshape(tuple(shape)))


@BOUND_RULES.register("permute")
def permute(call: Call) -> Interval:
    """permute: [permute(l), permute(u)]."""
    p = call.bind((("input", REQUIRED), ("*dims", REQUIRED)))
    x = interval_arg(call, p["input"], "the input")
    return x.map(lambda t: t.permute(*p["dims"]))


@BOUND_RULES.register("transpose")
def transpose(call: Call) -> Interval:
    """transpose: [transpose(l), transpose(u)]."""
    p = call.bind((("input", REQUIRED), ("dim0", REQUIRED), ("dim1", REQUIRED)))
    x = interval_arg(call, p["input"], "the input")
    return x.map(lambda t: torch.transpose(t, p["dim0"], p["dim1"]))


def _on_ends(call: Call, x: Interval):
    """The node's own op on each end point: exact for ops that only move, copy or select entries."""
    run = replay(call, x)
    return run(x.lo), run(x.hi)


def _moved(call: Call):
    """Bounds of a pure move (unsqueeze, squeeze, unflatten, expand) of its one interval argument."""
    x = interval_arg(call, call.first_input, "the input")
    others = [a for a in list(call.args[1:]) + list(call.kwargs.values()) if isinstance(a, Interval)]
    if others:
        raise call.fail("only the moved tensor may depend on the input")
    lo, hi = _on_ends(call, x)
    return Interval(lo, hi)


@BOUND_RULES.register("unsqueeze")
def unsqueeze(call: Call) -> Interval:
    """unsqueeze moves entries: [unsqueeze(l), unsqueeze(u)]."""
    return _moved(call)


@BOUND_RULES.register("squeeze")
def squeeze(call: Call) -> Interval:
    """squeeze moves entries: [squeeze(l), squeeze(u)]."""
    return _moved(call)


@BOUND_RULES.register("unflatten")
def unflatten(call: Call) -> Interval:
    """unflatten moves entries: [unflatten(l), unflatten(u)]."""
    return _moved(call)


@BOUND_RULES.register("expand")
def expand(call: Call) -> Interval:
    """expand repeats entries: [expand(l), expand(u)]."""
    return _moved(call)


def _pieces(call: Call, x: Interval) -> tuple:
    lo, hi = _on_ends(call, x)
    return tuple(Interval(a, b) for a, b in zip(lo, hi))


@BOUND_RULES.register("chunk")
def chunk(call: Call) -> tuple:
    """chunk splits into pieces: one interval per piece, [chunk(l)_i, chunk(u)_i]."""
    return _pieces(call, interval_arg(call, call.first_input, "the input"))


@BOUND_RULES.register("split")
def split(call: Call) -> tuple:
    """split into pieces: one interval per piece, [split(l)_i, split(u)_i]."""
    return _pieces(call, interval_arg(call, call.first_input, "the input"))


@BOUND_RULES.register("unbind")
def unbind(call: Call) -> tuple:
    """unbind along a dim: one interval per slice, [unbind(l)_i, unbind(u)_i]."""
    return _pieces(call, interval_arg(call, call.first_input, "the input"))


@BOUND_RULES.register("floordiv")
def floordiv(call: Call) -> Interval:
    """x // c for a constant c: floor(x / c) is monotone, [min, max] of floor(l / c), floor(u / c)."""
    # (shape arithmetic such as channels // groups has no bounds: it runs concretely)
    x, c = call.args[0], call.args[1] if len(call.args) > 1 else None
    if not isinstance(x, Interval) or isinstance(c, Interval) or c is None:
        raise call.fail("only an input-dependent value floor-divided by a constant is supported")
    lo, hi = torch.floor_divide(x.lo, c), torch.floor_divide(x.hi, c)
    return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))


@BOUND_RULES.register("getitem")
def getitem(call: Call):
    """x[idx] selects entries: [l[idx], u[idx]]; an item of a tuple of values is that value."""
    obj, index = call.args
    if isinstance(obj, Interval):
        concrete_arg(call, index, "the index")
        if isinstance(index, tuple) and any(isinstance(i, Interval) for i in index):
            raise call.fail("indexing with an input-dependent index is not supported")
        return Interval(obj.lo[index], obj.hi[index])
    concrete_arg(call, index, "the index")
    return operator.getitem(obj, index)


@BOUND_RULES.register("slice")
def slice_(call: Call) -> Interval:
    """aten.slice(x, dim, start, end, step) selects entries: [slice(l), slice(u)]."""
    p = call.bind((("input", REQUIRED), ("dim", 0), ("start", None), ("end", None), ("step", 1)))
    x = interval_arg(call, p["input"], "the input")
    return x.map(lambda t: aten.slice.Tensor(t, p["dim"], p["start"], p["end"], p["step"]))


@BOUND_RULES.register("select")
def select(call: Call) -> Interval:
    """aten.select(x, dim, index) selects entries: [select(l), select(u)]."""
    p = call.bind((("input", REQUIRED), ("dim", REQUIRED), ("index", REQUIRED)))
    x = interval_arg(call, p["input"], "the input")
    return x.map(lambda t: t.select(p["dim"], p["index"]))


@BOUND_RULES.register("size")
def size(call: Call):
    """x.size(d) / x.dim() / sym_size: the concrete shape, the same for every point of the box."""
    x = interval_arg(call, call.first_input, "the input")
    rest, kwargs = call.args[1:], call.kwargs
    if call.node.op == "call_method":
        return getattr(x.lo, call.node.target)(*rest, **kwargs)
    if call.target is aten.sym_size.int:
        return x.lo.size(*rest)
    return x.lo.size(*rest, **kwargs)


_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


@BOUND_RULES.register("getattr")
def getattr_(call: Call):
    """x.shape / x.ndim / x.dtype / x.device: the concrete attribute, the same for every point of the box."""
    x = interval_arg(call, call.first_input, "the input")
    name = call.args[1]
    if name not in _SHAPE_ATTRIBUTES:
        raise call.fail(f"attribute {name!r} of an input-dependent tensor; only {sorted(_SHAPE_ATTRIBUTES)}")
    return getattr(x.lo, name)


_DROPOUT_SIGNATURES = {
    F.dropout: (("input", REQUIRED), ("p", 0.5), ("training", True), ("inplace", False)),
    F.dropout2d: (("input", REQUIRED), ("p", 0.5), ("training", True), ("inplace", False)),
    torch.dropout: (("input", REQUIRED), ("p", REQUIRED), ("training", REQUIRED)),
    aten.dropout.default: (("input", REQUIRED), ("p", REQUIRED), ("training", REQUIRED)),
}
_PLAIN = (("input", REQUIRED), ("memory_format", None))


def _module_dropout(m) -> dict:
    if isinstance(m, torch.nn.AlphaDropout) or isinstance(m, torch.nn.FeatureAlphaDropout):
        return {"p": m.p, "training": m.training, "alpha": True}
    return {"p": getattr(m, "p", 0.0), "training": m.training}


@BOUND_RULES.register("identity")
def identity(call: Call) -> Interval:
    """identity / clone / eval-mode dropout: [l, u]; active dropout x/(1-p) or 0: [min(0, l/(1-p)), max(0, u/(1-p))]."""
    if call.module is not None:
        x = call.first_input
        p = _module_dropout(call.module) if not isinstance(call.module, torch.nn.Identity) else {"training": False}
    elif call.target in _DROPOUT_SIGNATURES:
        p = call.bind(_DROPOUT_SIGNATURES[call.target])
        x = p["input"]
    else:
        p = call.bind(_PLAIN)
        x = p["input"]
        p["training"] = False
    x = interval_arg(call, x, "the input")
    if not p["training"] or float(p["p"]) == 0.0:
        return x
    if p.get("alpha"):
        raise call.fail("alpha dropout in training mode cannot be bounded; put the model in eval mode")
    keep = 1.0 - float(p["p"])
    if keep <= 0.0:
        zeros = torch.zeros_like(x.lo)
        return Interval(zeros, zeros)
    return Interval(torch.clamp(x.lo / keep, max=0.0), torch.clamp(x.hi / keep, min=0.0))
