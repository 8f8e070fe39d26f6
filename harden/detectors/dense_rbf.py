"""An RBF SVM's decision function as plain ONNX algebra (float64), shared by SafetyNet and NIC.

The issues ask for the SVMs "through skl2onnx in float32".  harden deliberately deviates, for two measured
reasons:

* latency: skl2onnx emits ``ai.onnx.ml.SVMClassifier`` / ``SVMRegressor``, which onnxruntime evaluates one
  (input, support vector) pair at a time; SafetyNet's SVC cost 4.8x LeNet-5 at batch 256 that way, 1.2x with
  this graph (bench/experiments/safetynet_latency.py);
* precision: the ML operators run in float32 and the signed sum over support vectors cancels, so they drift
  1e-5..1e-3 from scikit-learn (libsvm works in double); NIC's exports sat at 2.6e-5..2.3e-4 against the
  1e-4 parity tolerance that way (measured on LeNet-5).

The graph computes ``sum_s dual_s exp(-gamma |x - s|^2) + intercept`` with
``-gamma |x - s|^2 = 2 gamma x.s - gamma |s|^2 - gamma |x|^2``: one MatMul against every support vector,
broadcast Adds, an Exp over the [N, S] kernel matrix and a MatMul with the dual coefficients.  Everything
after the float32 input runs in float64, as libsvm does, except ``x.s`` and ``|x|^2`` when they are exact in
float32 (``exact_int``: integer inputs and support vectors, no scaler, small enough sums).  Tests compare the
graph with scikit-learn and with skl2onnx (tests/test_safetynet.py, tests/test_nic.py).

Works for a binary ``SVC`` and a ``OneClassSVM`` (kernel ``rbf``), optionally after one ``StandardScaler`` in a
Pipeline: in both, scikit-learn's public ``dual_coef_`` and ``intercept_`` give ``decision_function`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError


@dataclass
class RbfParts:
    """The pieces of a fitted (scaler +) RBF SVM that the graph needs."""

    scaler: object | None
    svm: object

    @classmethod
    def of(cls, estimator) -> "RbfParts":
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC, OneClassSVM

        steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
        scaler = steps[0] if len(steps) == 2 else None
        svm = steps[-1]
        binary = isinstance(svm, SVC) and len(getattr(svm, "classes_", ())) == 2
        if (len(steps) > 2 or (scaler is not None and not isinstance(scaler, StandardScaler))
                or not (binary or isinstance(svm, OneClassSVM)) or svm.kernel != "rbf"):
            raise HardenError("the dense RBF graph takes a binary SVC or a OneClassSVM with kernel 'rbf', "
                              "optionally after one StandardScaler")
        return cls(scaler, svm)

    @property
    def support_vectors(self) -> np.ndarray:
        return np.asarray(self.svm.support_vectors_, dtype=np.float64)

    @property
    def exact_int(self) -> bool:
        """True when x.s and |x|^2 are exact in float32 for integer inputs of the same range."""
        sv = self.support_vectors
        return bool(self.scaler is None and np.array_equal(sv, np.round(sv))
                    and (np.abs(sv).max(initial=0.0) ** 2) * max(1, sv.shape[1]) < 2 ** 23)


def rbf_decision_graph(estimator, source: str, output: str, prefix: str, *, sign: float = 1.0,
                       exact_int: bool | None = None) -> tuple[list, list]:
    """(nodes, initializers) computing ``sign * decision_function`` of ``estimator`` from ``source``.

    ``source`` is float32 [N, D]; ``output`` is float32 [N].  Every internal name starts with ``prefix``; the
    constants are ``<prefix>sv_t`` [D, S], ``two_gamma``, ``sv_bias`` [1, S], ``minus_gamma``, ``dual`` [S, 1],
    ``intercept`` (and ``mean``, ``scale`` with a scaler), all float64 but ``sv_t`` when ``exact_int``.
    ``exact_int`` None: decided from the support vectors (:attr:`RbfParts.exact_int`); the caller must pass
    False when its inputs may be non-integers although the support vectors are integers.
    """
    parts = RbfParts.of(estimator)
    exact = parts.exact_int if exact_int is None else bool(exact_int and parts.exact_int)
    gamma = float(parts.svm._gamma)
    sv = parts.support_vectors
    narrow = np.float32 if exact else np.float64
    consts = {
        "sv_t": sv.T.astype(narrow),                                                   # [D, S]
        "two_gamma": np.array(2.0 * gamma),
        "sv_bias": (-gamma * (sv ** 2).sum(axis=1))[None],                             # [1, S]
        "minus_gamma": np.array(-gamma),
        # the orientation is folded into the coefficients (no node for it; exact for sign +-1)
        "dual": float(sign) * np.asarray(parts.svm.dual_coef_, dtype=np.float64).T.copy(),   # [S, 1]
        "intercept": float(sign) * np.asarray(parts.svm.intercept_, dtype=np.float64).reshape(1),
    }
    if parts.scaler is not None:
        consts["mean"] = np.asarray(parts.scaler.mean_, dtype=np.float64)
        consts["scale"] = np.asarray(parts.scaler.scale_, dtype=np.float64)
    p = prefix
    inits = [numpy_helper.from_array(np.asarray(v, dtype=narrow if k == "sv_t" else np.float64), p + k)
             for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axis"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "flat")]
    n = helper.make_node
    double = TensorProto.DOUBLE
    if exact:  # integer codes: x.s and |x|^2 are exact in float32
        nodes = [
            n("MatMul", [source, p + "sv_t"], [p + "dot32"]),
            n("Cast", [p + "dot32"], [p + "dot"], to=double),
            n("Mul", [source, source], [p + "x2_32"]),
            n("ReduceSum", [p + "x2_32", p + "axis"], [p + "x_sq32"], keepdims=1),
            n("Cast", [p + "x_sq32"], [p + "x_sq"], to=double),
        ]
    else:
        nodes = [n("Cast", [source], [p + "x" if parts.scaler is not None else p + "z"], to=double)]
        if parts.scaler is not None:
            nodes += [n("Sub", [p + "x", p + "mean"], [p + "centred"]), n("Div", [p + "centred", p + "scale"], [p + "z"])]
        nodes += [
            n("MatMul", [p + "z", p + "sv_t"], [p + "dot"]),
            n("Mul", [p + "z", p + "z"], [p + "z2"]),
            n("ReduceSum", [p + "z2", p + "axis"], [p + "x_sq"], keepdims=1),
        ]
    nodes += [
        n("Mul", [p + "dot", p + "two_gamma"], [p + "cross"]),              # [N, S]
        n("Mul", [p + "x_sq", p + "minus_gamma"], [p + "row_bias"]),       # [N, 1]
        n("Add", [p + "cross", p + "sv_bias"], [p + "partial"]),
        n("Add", [p + "partial", p + "row_bias"], [p + "exponent"]),
        n("Exp", [p + "exponent"], [p + "kernel"]),
        n("MatMul", [p + "kernel", p + "dual"], [p + "weighted"]),
        n("Add", [p + "weighted", p + "intercept"], [p + "decision"]),
        n("Reshape", [p + "decision", p + "flat"], [p + "flat_decision"]),
    ]
    nodes.append(n("Cast", [p + "flat_decision"], [output], to=TensorProto.FLOAT))
    return nodes, inits


class RbfSvmDetector:
    """A fitted binary RBF SVC (optionally after a StandardScaler) as a harden detector, in dense ONNX algebra.

    ``score`` is scikit-learn's own ``decision_function``, the reference the export is checked against.  Input
    ``<name>.features`` [N, D] float32, output ``<name>.raw`` [N] float32; the initializers ``svm_*`` (``svm_sv_t``,
    ``svm_dual``, ...) are what SafetyNet's adaptive surrogate (:mod:`harden.methods.safetynet_adaptive`) reads
    back from a bundle.  See the module docstring for why this is not skl2onnx.
    """

    def __init__(self, estimator, method_name: str, n_features: int, *, exact_int: bool | None = None):
        """``exact_int`` False: the inputs may be fractions although the support vectors are integers."""
        from sklearn.svm import SVC

        self.estimator = estimator
        self.method_name = method_name
        self.n_features = int(n_features)
        parts = RbfParts.of(estimator)
        if not isinstance(parts.svm, SVC):
            raise HardenError("RbfSvmDetector takes a binary RBF SVC, optionally after one StandardScaler")
        self.scaler, self.svc = parts.scaler, parts.svm
        self.exact_int = parts.exact_int if exact_int is None else bool(exact_int and parts.exact_int)
        self._onnx: bytes | None = None

    @property
    def support_vectors(self) -> int:
        return int(self.svc.n_support_.sum())

    def score(self, features: np.ndarray) -> np.ndarray:
        decision = self.estimator.decision_function(np.asarray(features, dtype=np.float32))
        return np.asarray(decision, dtype=np.float32).reshape(-1)

    def onnx_model(self) -> bytes:
        if self._onnx is None:
            self._onnx = self._build().SerializeToString()
        return self._onnx

    def _build(self):
        import onnx

        from harden.core.opsets import IR_VERSION, OPSET

        features, raw = f"{self.method_name}.features", f"{self.method_name}.raw"
        nodes, inits = rbf_decision_graph(self.estimator, features, raw, "svm_", exact_int=self.exact_int)
        graph = helper.make_graph(
            nodes, f"{self.method_name}_rbf_svm",
            [helper.make_tensor_value_info(features, TensorProto.FLOAT, [None, self.n_features])],
            [helper.make_tensor_value_info(raw, TensorProto.FLOAT, [None])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="harden")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def rbf_decisions_graph(columns: list[tuple[object, int, int, float]], source: str, output: str,
                        prefix: str, *, float32_exp: bool = False) -> tuple[list, list]:
    """(nodes, initializers) computing several RBF SVMs on column ranges of ``source`` at once.

    ``columns``: ``(estimator, start, stop, sign)`` per SVM, each reading ``source[:, start:stop]``; ``output`` is
    float32 [N, len(columns)], column j = ``sign_j * decision_j``.  One float64 cast of ``source``; per SVM a
    Slice and two MatMuls; then ONE Exp over the joined [N, sum S_j] exponents and ONE MatMul with the block
    matrix of dual coefficients (onnxruntime's cost per node dominated NIC's small SVMs).

    A StandardScaler (mean m, scale s) is folded into the constants instead of costing two nodes per SVM: with
    z = (x - m) / s, the exponent -gamma |z - v|^2 of support vector v is
    ``x . (2 gamma (v / s + m / s^2)) + x^2 . (-gamma / s^2) + c_v``, c_v = -gamma (|v|^2 + 2 m.(v / s) + |m / s|^2);
    all in float64 (the inputs are softmax probabilities and standardised features, so the terms stay within a
    few orders of magnitude of the result; measured against scikit-learn in tests/test_nic.py).

    ``float32_exp``: the exponents are rounded to float32 for the Exp (onnxruntime's float64 Exp was the largest
    node of NIC's detector; float32: a relative error of a few 1e-7 in each kernel value, below the float32
    rounding the scores get anyway).
    """
    n = helper.make_node
    double = TensorProto.DOUBLE
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    axis = const("axis", np.array([1], dtype=np.int64))
    nodes.append(n("Cast", [source], [prefix + "source"], to=double))   # one cast for every SVM
    exponents, sv_bias, duals, intercepts = [], [], [], []
    for j, (estimator, start, stop, sign) in enumerate(columns):
        parts = RbfParts.of(estimator)
        gamma = float(parts.svm._gamma)
        sv = parts.support_vectors                                                           # [S, d]
        d = sv.shape[1]
        mean = np.zeros(d) if parts.scaler is None else np.asarray(parts.scaler.mean_, dtype=np.float64)
        scale = np.ones(d) if parts.scaler is None else np.asarray(parts.scaler.scale_, dtype=np.float64)
        q = f"{prefix}{j}/"
        starts = const(f"{j}/start", np.array([start], dtype=np.int64))
        stops = const(f"{j}/stop", np.array([stop], dtype=np.int64))
        linear = 2.0 * gamma * (sv / scale + mean / scale ** 2).T                             # [d, S]
        square = (-gamma / scale ** 2)[:, None]                                               # [d, 1]
        nodes += [
            n("Slice", [prefix + "source", starts, stops, axis], [q + "x"]),
            n("MatMul", [q + "x", const(f"{j}/linear", linear.copy())], [q + "cross"]),     # [N, S]
            n("Mul", [q + "x", q + "x"], [q + "x2"]),
            n("MatMul", [q + "x2", const(f"{j}/square", square)], [q + "row_bias"]),         # [N, 1]
            n("Add", [q + "cross", q + "row_bias"], [q + "exponent"]),
        ]
        exponents.append(q + "exponent")
        sv_bias.append(-gamma * ((sv ** 2).sum(axis=1) + 2.0 * (sv / scale) @ mean + ((mean / scale) ** 2).sum()))
        duals.append(float(sign) * np.asarray(parts.svm.dual_coef_, dtype=np.float64).reshape(-1))
        intercepts.append(float(sign) * float(np.asarray(parts.svm.intercept_).reshape(-1)[0]))
    block = np.zeros((sum(len(d) for d in duals), len(columns)))
    row = 0
    for j, d in enumerate(duals):
        block[row : row + len(d), j] = d
        row += len(d)
    nodes += [
        n("Concat", exponents, [prefix + "exponents"], axis=1),
        n("Add", [prefix + "exponents", const("sv_bias", np.concatenate(sv_bias)[None])], [prefix + "exponent"]),
    ]
    if float32_exp:
        nodes += [
            n("Cast", [prefix + "exponent"], [prefix + "exponent32"], to=TensorProto.FLOAT),
            n("Exp", [prefix + "exponent32"], [prefix + "kernel32"]),
            n("Cast", [prefix + "kernel32"], [prefix + "kernel"], to=double),
        ]
    else:
        nodes.append(n("Exp", [prefix + "exponent"], [prefix + "kernel"]))
    nodes += [
        n("MatMul", [prefix + "kernel", const("dual", block)], [prefix + "weighted"]),            # [N, P]
        n("Add", [prefix + "weighted", const("intercept", np.array(intercepts))], [prefix + "decisions"]),
        n("Cast", [prefix + "decisions"], [output], to=TensorProto.FLOAT),
    ]
    return nodes, inits
