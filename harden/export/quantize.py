"""int8 recipes for an exported graph (onnxruntime.quantization) that keep the alarm working.

Quantising the whole graph moves every activation by up to half a quantisation step.  The classifier survives
that; the detectors do not, because they compare activations with thresholds calibrated in float: quantised
SafetyNet codes alarm on every clean input, and quantised guards stop alarming on non-finite rows.  The
recipes, by what stays in float:

- ``whole``: nothing (onnxruntime's own defaults), for comparison;
- ``detectors``: every node the alarm is computed by (everything that is not on the path from the input to
  the logits: the heads, the scikit-learn detectors, the policy and the non-finite guard);
- ``detector-inputs``: those, and also the classifier nodes whose outputs the detectors read (the sites'
  activations and the layers producing them), so the detectors see float values computed from the quantised
  layers before them.

The recipe a deployer should use is the cheapest one whose alarms agree with the float graph on clean and
attacked inputs (``bench/edge.py`` measures it per method).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from harden.errors import HardenError

RECIPES = ("whole", "detectors", "detector-inputs")
MODES = ("dynamic", "static")
LOGITS = "logits"


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def classifier_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes the logits depend on (the classifier proper)."""
    produced = _producers(model.graph)
    seen: set[str] = set()
    stack = [LOGITS]
    while stack:
        node = produced.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def float_nodes(model: onnx.ModelProto, recipe: str) -> list[str]:
    """The nodes a recipe leaves in float (``nodes_to_exclude`` of onnxruntime's quantisers)."""
    if recipe not in RECIPES:
        raise HardenError(f"quantisation recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    unnamed = [n for n in model.graph.node if not n.name]
    if unnamed:
        raise HardenError(f"{len(unnamed)} node(s) have no name; the recipes exclude nodes by name")
    if recipe == "whole":
        return []
    classifier = classifier_nodes(model)
    detector = [n for n in model.graph.node if n.name not in classifier]
    keep = {n.name for n in detector}
    if recipe == "detector-inputs":
        read = {name for n in detector for name in n.input}
        keep |= {n.name for n in model.graph.node if n.name in classifier and set(n.output) & read}
    return sorted(keep)


class _Calibration:
    """onnxruntime's CalibrationDataReader over clean inputs, in batches."""

    def __init__(self, x: np.ndarray, batch_size: int = 64):
        self.batches = [np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)
                        for i in range(0, len(x), batch_size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"input": self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def quantize_int8(model: onnx.ModelProto, mode: str, recipe: str, calibration: np.ndarray | None = None) -> bytes:
    """The model quantised to int8 by onnxruntime (``dynamic``: weights only; ``static``: QDQ with activation
    ranges from ``calibration``, clean inputs), the ``recipe``'s nodes left in float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in MODES:
        raise HardenError(f"quantisation mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise HardenError("static quantisation needs calibration inputs")
    exclude = float_nodes(model, recipe)
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, str(source))
        if mode == "dynamic":
            # Weights of the matrix products only: onnxruntime's dynamic ConvInteger path lost the tiny
            # classifiers' decisions outright (bench/edge.py); dynamic quantisation is meant for MatMul/Gemm.
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             op_types_to_quantize=["MatMul", "Gemm"])
        else:
            quantize_static(str(source), str(target), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude)
        quantized = onnx.load(str(target))
    if recipe != "whole":
        _float_reads(quantized, set(exclude), {i.name for i in model.graph.input})
    return quantized.SerializeToString()


def _float_reads(model: onnx.ModelProto, float_names: set[str], graph_inputs: set[str]) -> None:
    """Give the nodes left in float the float tensors they read in the float graph, where the quantiser made
    them read a quantise-dequantise copy (it rewires every reader of a quantised tensor, excluded or not: the
    non-finite guard then saw NaN quantised to a number).  Only tensors that are still computed in float (a
    graph input, or an output of a node left in float) are restored."""
    quantized_from = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_made = graph_inputs | {out for n in model.graph.node if n.name in float_names for out in n.output}
    original = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized_from:
            source = quantized_from[node.input[0]]
            if source in float_made:
                original[node.output[0]] = source
    for node in model.graph.node:
        if node.name in float_names:
            node.input[:] = [original.get(name, name) for name in node.input]
