"""A detector's ONNX graph run with torch ops: the same numbers, plus gradients.

The adaptive attack needs the shipped detector's score as a differentiable
function of the features.  Every method's detector is plain ONNX algebra
(:mod:`harden.detectors.dense_rbf`, :mod:`harden.detectors.nic_onnx`), a
handful of ops, so the graph itself is interpreted op by op in torch (float64
where the graph says so) instead of a second hand-written copy per method that
could drift from what is exported.  onnx2torch was not taken: it rebuilds
``nn.Module`` trees for whole networks and adds a dependency for a dozen ops.

``widen`` divides the argument of every ``Exp`` (in these graphs the RBF
kernel's ``-gamma |x - s|^2``), i.e. gamma by ``widen``: a smoother score whose
far-away support vectors still give a gradient.  ``widen = 1`` is the exact graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError

_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.INT64: torch.int64,
           TensorProto.BOOL: torch.bool, TensorProto.INT32: torch.int32}


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reduce_sum(node, x, axes=None):
    keep = bool(_attr(node, "keepdims", 1))
    if axes is None:
        return x.sum() if not _attr(node, "noop_with_empty_axes", 0) else x
    return x.sum(dim=tuple(int(a) for a in axes.tolist()), keepdim=keep)


def _slice(node, x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes, starts.tolist(), ends.tolist(), steps):
        size = x.shape[a]
        s, e = max(min(s, size), -size), max(min(e, size), -size - 1)
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _reshape(node, x, shape):
    dims = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d) for i, d in enumerate(shape.tolist())]
    return x.reshape(dims)


def _topk(node, x, k):
    values, indices = torch.topk(x, int(k.reshape(-1)[0]), dim=int(_attr(node, "axis", -1)),
                                 largest=bool(_attr(node, "largest", 1)), sorted=True)
    return values, indices


def _gather(node, x, index):
    axis = int(_attr(node, "axis", 0))
    out = torch.index_select(x, axis, index.reshape(-1).long())
    return out.reshape(x.shape[:axis] + index.shape + x.shape[axis + 1 :])


def _unsqueeze(node, x, axes):
    for a in sorted(int(v) for v in axes.tolist()):
        x = x.unsqueeze(a)
    return x


OPS: dict[str, Callable] = {
    "Identity": lambda node, x: x,
    "Cast": lambda node, x: x.to(_DTYPES[int(_attr(node, "to"))]),
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": lambda node, a, b: a / b,
    "Neg": lambda node, a: -a,
    "MatMul": lambda node, a, b: a @ b,
    "Exp": lambda node, a: torch.exp(a),
    "Concat": lambda node, *xs: torch.cat(xs, dim=int(_attr(node, "axis"))),
    "ReduceSum": _reduce_sum,
    "Slice": _slice,
    "Reshape": _reshape,
    "TopK": _topk,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
}


class TorchOnnx(torch.nn.Module):
    """``TorchOnnx(model_bytes)(features) -> the graph's single output``, differentiable in ``features``."""

    def __init__(self, model_bytes: bytes, widen: float = 1.0):
        super().__init__()
        import onnx

        model = onnx.load_from_string(model_bytes)
        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS})
        if unknown:
            raise HardenError(f"the adaptive attack cannot differentiate detector op(s) {', '.join(unknown)}")
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise HardenError("the adaptive attack takes detector graphs with one input and one output")
        self.nodes = list(graph.node)
        self.input_name, self.output_name = graph.input[0].name, graph.output[0].name
        self.constants = {i.name: torch.from_numpy(np.array(numpy_helper.to_array(i))) for i in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                raise HardenError("the adaptive attack expects detector constants as initializers")
        self.widen = float(widen)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = dict(self.constants)
        values[self.input_name] = features
        for node in self.nodes:
            args = [values[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            if node.op_type == "Exp" and self.widen != 1.0:
                args = [args[0] / self.widen]
            out = OPS[node.op_type](node, *args)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(node.output, outs):
                values[name] = value
        return values[self.output_name]
