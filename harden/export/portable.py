"""``harden export --target portable``: the graph in float32 throughout, for runtimes without float64 kernels.

SafetyNet's SVM, NIC's invariants and mismatch's SVC are exported as float64 algebra by default (exact on the
Python side's terms).  Edge runtimes and converters (TFLite via onnx2tf, float16 conversion, some NPUs) have no
float64 kernels, so the portable target rewrites every float64 tensor as float32: initializers, Constant
nodes, Cast targets and declared value types.  The export then re-checks parity against the Python side:
logits within 1e-4 as always, scores within ``PORTABLE_SCORE_TOLERANCE``, alarms identical but where the
reference score is that close to its threshold; where float32 rounding moves more, the export fails and says so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TARGETS = ("default", "portable")
# Scores of float64 algebra evaluated in float32 move by a few 1e-4 of a threshold's scale (an RBF sum over
# hundreds of support vectors); logits are untouched (the classifier is float32 already).  An alarm may differ
# only where the reference score lies within this of the threshold.
PORTABLE_SCORE_TOLERANCE = 1e-3


def _float32_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(array, tensor.name)


def _rewrite_graph(graph: onnx.GraphProto) -> int:
    changed = 0
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.DOUBLE:
            graph.initializer[i].CopyFrom(_float32_tensor(init))
            changed += 1
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.DOUBLE:
                attr.i = TensorProto.FLOAT
                changed += 1
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                attr.t.CopyFrom(_float32_tensor(attr.t))
                changed += 1
            elif attr.type == onnx.AttributeProto.GRAPH:
                changed += _rewrite_graph(attr.g)
        if node.op_type in ("ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform"):
            for attr in node.attribute:
                if attr.name == "dtype" and attr.i == TensorProto.DOUBLE:
                    attr.i = TensorProto.FLOAT
                    changed += 1
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor = value.type.tensor_type
        if tensor.elem_type == TensorProto.DOUBLE:
            tensor.elem_type = TensorProto.FLOAT
            changed += 1
    return changed


def _drop_float_casts(model: onnx.ModelProto) -> None:
    """Casts of a float32 tensor to float32 (float32 <-> float64 casts before the rewrite) become Identity:
    harmless to onnxruntime, but float16 converters rewrite their target type and leave the graph mistyped."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type != "Cast" or types.get(node.input[0]) != TensorProto.FLOAT:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if to == TensorProto.FLOAT:
            node.op_type = "Identity"
            del node.attribute[:]


def _outputs_read_by_no_node(graph: onnx.GraphProto) -> None:
    """A graph output that nodes also read (NIC's probes read ``logits``) is given its own Identity: float16
    converters that keep the graph's outputs float32 (``keep_io_types``) cast the output tensor, and a node
    reading it would then see float32 where the rest of its block is float16."""
    outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input} & outputs
    for name in sorted(read):
        inner = f"{name}/value"
        for node in graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
            node.output[:] = [inner if o == name else o for o in node.output]
        for value in graph.value_info:
            if value.name == name:
                value.name = inner
        graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}/output"))


def float32_throughout(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every float64 tensor made float32, and how many places changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = _rewrite_graph(out.graph)
    _drop_float_casts(out)
    _outputs_read_by_no_node(out.graph)
    return out, changed


def float64_places(model: onnx.ModelProto) -> int:
    """How many float64 tensors (initializers, casts, declared types) ``model`` holds; 0 for a portable graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    return _rewrite_graph(probe.graph)
