"""A fitted scikit-learn estimator as a harden detector: features -> raw score, in Python and as ONNX.

skl2onnx converts the estimator with raw decision scores and no ZipMap; a
few nodes appended here pick the score column, orient it so higher means
more suspicious, and flatten it to [N].  onnxruntime has no double-precision
one-class SVM, so everything is float32.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.core.onnx_edit import rename_edge
from harden.core.opsets import IR_VERSION, ML_OPSET, OPSET


class SklearnDetector:
    """``sign * decision_function(features)[:, column]`` (column None for 1-d decision functions)."""

    def __init__(self, estimator, method_name: str, n_features: int, *, column: int | None = None, sign: float = 1.0):
        self.estimator = estimator
        self.method_name = method_name
        self.n_features = int(n_features)
        self.column = column
        self.sign = float(sign)
        self._onnx: bytes | None = None

    def score(self, features: np.ndarray) -> np.ndarray:
        decision = np.asarray(self.estimator.decision_function(np.asarray(features, dtype=np.float32)))
        if decision.ndim == 2:
            decision = decision[:, self.column or 0]
        return (self.sign * decision).astype(np.float32).reshape(-1)

    def onnx_model(self) -> bytes:
        if self._onnx is None:
            self._onnx = convert(self.estimator, f"{self.method_name}.features", f"{self.method_name}.raw",
                                 self.n_features, column=self.column, sign=self.sign).SerializeToString()
        return self._onnx


def _options_for(estimator) -> dict:
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC

    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    if isinstance(final, SVC):
        return {id(final): {"zipmap": False, "raw_scores": True}}
    return {}


def convert(estimator, input_name: str, output_name: str, n_features: int, *, column: int | None, sign: float) -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = to_onnx(estimator, initial_types=[("harden_features", FloatTensorType([None, n_features]))],
                        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET}, options=_options_for(estimator))
    graph = model.graph
    decision = graph.output[-1].name  # 'scores' / 'probabilities' (raw decision values with raw_scores)
    flat = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None])
    nodes, inits = [], []
    source = decision
    if column is not None:
        inits.append(numpy_helper.from_array(np.array([column], dtype=np.int64), "harden_column"))
        nodes.append(helper.make_node("Gather", [source, "harden_column"], ["harden_picked"], axis=1))
        source = "harden_picked"
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "harden_flat_shape"))
    nodes.append(helper.make_node("Reshape", [source, "harden_flat_shape"], ["harden_flat"]))
    inits.append(numpy_helper.from_array(np.array(sign, dtype=np.float32), "harden_sign"))
    nodes.append(helper.make_node("Mul", ["harden_flat", "harden_sign"], [output_name]))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(flat)
    rename_edge(model, "harden_features", input_name)  # skl2onnx would mangle the '.' in our names
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
