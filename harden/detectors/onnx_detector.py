"""A detector held as ONNX only (as loaded from a bundle): scored through onnxruntime.

A bundle's detector is a graph from elsewhere; :func:`check_detector_onnx` admits only what harden's own
detectors are made of (``DETECTOR_OPS``: ONNX algebra and scikit-learn's linear and SVM operators), with
every tensor stored inside the model (an ONNX file may point at external data files: never followed), no
subgraphs or functions, and the one-input one-output interface export relies on.
"""

from __future__ import annotations

import numpy as np

from harden.errors import HardenError

# Op types of the default and ML domains a detector graph may use: what dense_rbf, nic_onnx and skl2onnx's
# linear, scaler and SVM converters emit.  No op whose output size comes from a tensor's values (Expand,
# Tile, ConstantOfShape, Range, Resize, Pad), no random ops, no control flow.
DETECTOR_OPS: frozenset[tuple[str, str]] = frozenset({
    *(("", op) for op in (
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "MatMul", "Gemm",
        "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice", "Gather", "Identity",
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "TopK", "Max", "Min", "Sum",
        "Mean", "Clip", "Relu", "Sigmoid", "Tanh", "Softmax", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
        "Equal", "Not", "And", "Or", "Where", "Floor", "Ceil", "Sign", "Constant", "Shape", "IsNaN", "IsInf",
    )),
    *(("ai.onnx.ml", op) for op in (
        "SVMClassifier", "SVMRegressor", "Scaler", "Normalizer", "LinearClassifier", "LinearRegressor",
        "ArrayFeatureExtractor", "Binarizer",
    )),
})


def _tensors_of(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors


def check_detector_onnx(data: bytes, name: str, where: str) -> None:
    """Refuse (one line) a detector graph outside DETECTOR_OPS, with external data, or with the wrong interface."""
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others for damaged bytes
        raise HardenError(f"{where} is not a readable ONNX model ({type(exc).__name__})") from None
    graph = model.graph
    if model.functions:
        raise HardenError(f"{where} defines ONNX functions, which a harden detector never holds")
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            raise HardenError(f"{where} imports operator domain {opset.domain!r:.60}, which harden does not run")
    for node in graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) not in DETECTOR_OPS:   # (a damaged name may come back as bytes: shown with repr)
            raise HardenError(f"{where} uses op {node.op_type!r:.40} of domain {domain!r:.40}, which is not one "
                              "harden's detectors use")
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            raise HardenError(f"{where}: node {node.name!r:.60} holds a subgraph, which harden's detectors never do")
    for tensor in _tensors_of(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise HardenError(f"{where}: tensor {tensor.name!r:.60} points at an external data file; harden never "
                              "follows a path stored inside a model")
    inputs = [v.name for v in graph.input if v.name not in {t.name for t in graph.initializer}]
    outputs = [v.name for v in graph.output]
    if inputs != [f"{name}.features"] or outputs != [f"{name}.raw"]:
        raise HardenError(f"{where} has interface {inputs} -> {outputs}, expected ['{name}.features'] -> ['{name}.raw']")


class OnnxDetector:
    def __init__(self, model: bytes, what: str = "the detector"):
        from harden.core.ort import inference_session

        self._model = model
        self._session = inference_session(model, what)
        self._input = self._session.get_inputs()[0].name

    def score(self, features: np.ndarray) -> np.ndarray:
        (raw,) = self._session.run(None, {self._input: np.ascontiguousarray(features, dtype=np.float32)})
        return raw.reshape(-1)

    def onnx_model(self) -> bytes:
        return self._model
