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
float32 (``exact_int``: integer inputs and support vectors, no scaler, small enough sums) or nearly so
(``centred``: SafetyNet's codes, integers but for a few ramp fractions, taken around integer centres; see
:func:`_centred_graph`), and NIC's unscaled SVMs' exponents (:func:`rbf_decisions_graph`).  Tests compare the
graph with scikit-learn and with skl2onnx (tests/test_safetynet.py, tests/test_nic.py).

Works for a binary ``SVC`` and a ``OneClassSVM`` (kernel ``rbf``), optionally after one ``StandardScaler`` in a
Pipeline: in both, scikit-learn's public ``dual_coef_`` and ``intercept_`` give ``decision_function`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from harden.detectors.finite_rows import score_finite_rows
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
                       exact_int: bool | None = None, centred: bool = False) -> tuple[list, list]:
    """(nodes, initializers) computing ``sign * decision_function`` of ``estimator`` from ``source``.

    ``source`` is float32 [N, D]; ``output`` is float32 [N].  Every internal name starts with ``prefix``; the
    constants are ``<prefix>sv_t`` [D, S], ``two_gamma``, ``sv_bias`` [1, S], ``minus_gamma``, ``dual`` [S, 1],
    ``intercept`` (and ``mean``, ``scale`` with a scaler), all float64 but ``sv_t`` when ``exact_int``.
    ``exact_int`` None: decided from the support vectors (:attr:`RbfParts.exact_int`); the caller must pass
    False when its inputs may be non-integers although the support vectors are integers.

    ``centred`` (no scaler; inputs and support vectors small numbers, mostly integers: SafetyNet's codes): the
    products in float32 around a per-feature integer centre, see :func:`_centred_products`.
    """
    parts = RbfParts.of(estimator)
    if centred and parts.scaler is None:
        return _centred_graph(parts, source, output, prefix, sign)
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
    return nodes + _decision(n, p, output), inits


def _centred_graph(parts: RbfParts, source: str, output: str, prefix: str, sign: float) -> tuple[list, list]:
    """The decision function with ``x.s`` and ``|x|^2`` in float32 around a per-feature integer centre c.

    ``|x - s|^2 = |x - c|^2 + |s - c|^2 - 2 (x - c).(s - c)``, the two products in float32 (MLAS's SGEMM, where
    a float64 MatMul over SafetyNet's 19,456 code features and 472 support vectors cost 34 ms at batch 64 on a
    ResNet-18, more than the classifier), the rest in float64 as before.  Why this stays within the float64
    graph's parity: c is the support vectors' column mean rounded to an integer, so integer codes stay exact
    integers after centring, every product of two of them is an exact integer and so is every partial sum (far
    below 2^24): only the rare fractional codes (a value within its ramp above a threshold) round, and at the
    scale of the centred partial sums (+-3 per term around 0, sums of a few hundred) rather than of the
    uncentred ones (tens of thousands), i.e. by ~1e-5 in ``x.s`` per fraction where the exponent is
    ``gamma`` (~1e-4) times that.  An error in ``|x - c|^2`` scales a row's every kernel value alike, so it moves
    the score by ``gamma * error * (score - intercept)``.  Measured against scikit-learn in
    tests/test_safetynet.py.  The constants keep the float64 graph's names (``sv_t`` the support vectors
    themselves, float32: codes are float32 numbers), with ``centre`` beside them; ``sv_t - centre`` is a
    constant node onnxruntime folds when the session loads.
    """
    gamma = float(parts.svm._gamma)
    sv = parts.support_vectors                                                          # [S, D], float64
    centre = np.round(sv.mean(axis=0)) if len(sv) else np.zeros(sv.shape[1])
    p = prefix
    n = helper.make_node
    double = TensorProto.DOUBLE
    consts = {
        "sv_t": sv.T.astype(np.float32),                                                # [D, S]
        "centre": centre.astype(np.float32),                                            # [D]
        "centre_col": centre.astype(np.float32)[:, None],                               # [D, 1]
        "two_gamma": np.array(2.0 * gamma),
        "sv_bias": (-gamma * ((sv - centre) ** 2).sum(axis=1))[None],                   # [1, S], float64
        "minus_gamma": np.array(-gamma),
        "dual": float(sign) * np.asarray(parts.svm.dual_coef_, dtype=np.float64).T.copy(),   # [S, 1]
        "intercept": float(sign) * np.asarray(parts.svm.intercept_, dtype=np.float64).reshape(1),
    }
    inits = [numpy_helper.from_array(np.asarray(v), p + k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axis"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "flat")]
    nodes = [
        n("Sub", [source, p + "centre"], [p + "xc"]),
        n("Sub", [p + "sv_t", p + "centre_col"], [p + "svc_t"]),          # constant: folded by onnxruntime
        n("MatMul", [p + "xc", p + "svc_t"], [p + "dot32"]),
        n("Cast", [p + "dot32"], [p + "dot"], to=double),
        n("Mul", [p + "xc", p + "xc"], [p + "x2_32"]),
        n("ReduceSum", [p + "x2_32", p + "axis"], [p + "x_sq32"], keepdims=1),
        n("Cast", [p + "x_sq32"], [p + "x_sq"], to=double),
    ]
    return nodes + _decision(n, p, output), inits


class RbfSvmDetector:
    """A fitted binary RBF SVC (optionally after a StandardScaler) as a harden detector, in dense ONNX algebra.

    ``score`` is scikit-learn's own ``decision_function``, the reference the export is checked against.  Input
    ``<name>.features`` [N, D] float32, output ``<name>.raw`` [N] float32; the initializers ``svm_*`` (``svm_sv_t``,
    ``svm_dual``, ...) are what SafetyNet's adaptive surrogate (:mod:`harden.methods.safetynet_adaptive`) reads
    back from a bundle.  See the module docstring for why this is not skl2onnx.
    """

    def __init__(self, estimator, method_name: str, n_features: int, *, exact_int: bool | None = None,
                 centred: bool = False):
        """``exact_int`` False: the inputs may be fractions although the support vectors are integers;
        ``centred``: float32 products around an integer centre (:func:`_centred_graph`; no scaler)."""
        from sklearn.svm import SVC

        self.estimator = estimator
        self.method_name = method_name
        self.n_features = int(n_features)
        parts = RbfParts.of(estimator)
        if not isinstance(parts.svm, SVC):
            raise HardenError("RbfSvmDetector takes a binary RBF SVC, optionally after one StandardScaler")
        self.scaler, self.svc = parts.scaler, parts.svm
        self.exact_int = parts.exact_int if exact_int is None else bool(exact_int and parts.exact_int)
        self.centred = bool(centred and self.scaler is None)
        self._onnx: bytes | None = None

    @property
    def support_vectors(self) -> int:
        return int(self.svc.n_support_.sum())

    def score(self, features: np.ndarray) -> np.ndarray:
        return score_finite_rows(features, self._decision)

    def _decision(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.decision_function(features), dtype=np.float32).reshape(-1)

    def onnx_model(self) -> bytes:
        if self._onnx is None:
            self._onnx = self._build().SerializeToString()
        return self._onnx

    def _build(self):
        import onnx

        from harden.core.opsets import IR_VERSION, OPSET

        features, raw = f"{self.method_name}.features", f"{self.method_name}.raw"
        nodes, inits = rbf_decision_graph(self.estimator, features, raw, "svm_", exact_int=self.exact_int,
                                          centred=getattr(self, "centred", False))
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
    float32 [N, len(columns)], column j = ``sign_j * decision_j``.  One float64 cast of the columns the float64
    SVMs read; per SVM a Slice and one or two MatMuls; then one Exp over the joined exponents and one MatMul with
    a block matrix of dual coefficients per group of SVMs (onnxruntime's cost per node dominated NIC's small
    SVMs).

    A StandardScaler (mean m, scale s) is folded into the constants instead of costing two nodes per SVM: with
    z = (x - m) / s, the exponent -gamma |z - v|^2 of support vector v is
    ``x . (2 gamma (v / s + m / s^2)) + x^2 . (-gamma / s^2) + c_v``, c_v = -gamma (|v|^2 + 2 m.(v / s) + |m / s|^2);
    all in float64 (the inputs are softmax probabilities and standardised features, so the terms stay within a
    few orders of magnitude of the result; measured against scikit-learn in tests/test_nic.py).

    ``float32_exp``: the exponents are rounded to float32 for the Exp (onnxruntime's float64 Exp was the largest
    node of NIC's detector; float32: a relative error of a few 1e-7 in each kernel value, below the float32
    rounding the scores get anyway); and the SVMs without a scaler compute their exponents in float32 (the
    ``narrow`` group below), the others in float64 (``wide``).
    """
    n = helper.make_node
    double = TensorProto.DOUBLE
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    axis = const("axis", np.array([1], dtype=np.int64))
    fitted = [(RbfParts.of(estimator), start, stop, sign) for estimator, start, stop, sign in columns]
    # float32_exp: the SVMs without a scaler (standardised inputs; NIC's value invariants) compute their
    # exponents in float32, which they are rounded to for the Exp anyway: their terms (2 gamma x.v, gamma |x|^2,
    # gamma |v|^2 with gamma = 1 / d) are all of the order of the result, so float32 products move it by a few
    # float32 roundings, where a float64 MatMul per SVM cost most of NIC's detector (ResNet-18, 17 sites).  The
    # SVMs with a scaler folded into their constants keep float64: those terms can be 1 / scale^2 times larger
    # than the result and cancel.
    narrow = [float32_exp and p.scaler is None for p, *_ in fitted]
    order = [j for j in range(len(fitted)) if narrow[j]] + [j for j in range(len(fitted)) if not narrow[j]]
    wide_from = min((start for (_, start, _, _), w in zip(fitted, narrow) if not w), default=0)
    if not all(narrow):   # one cast for every float64 SVM, of the columns they read
        wide_to = max(stop for (_, _, stop, _), w in zip(fitted, narrow) if not w)
        if wide_from == 0:
            nodes.append(n("Cast", [source], [prefix + "source"], to=double))
        else:
            nodes += [n("Slice", [source, const("wide/start", np.array([wide_from], dtype=np.int64)),
                                  const("wide/stop", np.array([wide_to], dtype=np.int64)), axis], [prefix + "wide/x"]),
                      n("Cast", [prefix + "wide/x"], [prefix + "source"], to=double)]
    exponents, sv_bias, duals, intercepts = {}, {}, {}, {}
    square_columns, square_rows = [], []   # narrow SVMs: -gamma per column they read, one row-bias column each
    for j, (parts, start, stop, sign) in enumerate(fitted):
        gamma = float(parts.svm._gamma)
        sv = parts.support_vectors                                                           # [S, d]
        d = sv.shape[1]
        mean = np.zeros(d) if parts.scaler is None else np.asarray(parts.scaler.mean_, dtype=np.float64)
        scale = np.ones(d) if parts.scaler is None else np.asarray(parts.scaler.scale_, dtype=np.float64)
        q = f"{prefix}{j}/"
        offset = 0 if narrow[j] else wide_from   # the float64 SVMs slice the cast columns
        starts = const(f"{j}/start", np.array([start - offset], dtype=np.int64))
        stops = const(f"{j}/stop", np.array([stop - offset], dtype=np.int64))
        linear = 2.0 * gamma * (sv / scale + mean / scale ** 2).T                             # [d, S]
        square = (-gamma / scale ** 2)[:, None]                                               # [d, 1]
        if narrow[j]:
            nodes += [
                n("Slice", [source, starts, stops, axis], [q + "x"]),
                n("MatMul", [q + "x", const(f"{j}/linear", linear.astype(np.float32))], [q + "exponent"]),
            ]
            square_columns.append((start, stop, -gamma))
            square_rows.append(len(sv))
        else:
            nodes += [
                n("Slice", [prefix + "source", starts, stops, axis], [q + "x"]),
                n("MatMul", [q + "x", const(f"{j}/linear", linear.copy())], [q + "cross"]),     # [N, S]
                n("Mul", [q + "x", q + "x"], [q + "x2"]),
                n("MatMul", [q + "x2", const(f"{j}/square", square)], [q + "row_bias"]),         # [N, 1]
                n("Add", [q + "cross", q + "row_bias"], [q + "exponent"]),
            ]
        exponents[j] = q + "exponent"
        sv_bias[j] = -gamma * ((sv ** 2).sum(axis=1) + 2.0 * (sv / scale) @ mean + ((mean / scale) ** 2).sum())
        duals[j] = float(sign) * np.asarray(parts.svm.dual_coef_, dtype=np.float64).reshape(-1)
        intercepts[j] = float(sign) * float(np.asarray(parts.svm.intercept_).reshape(-1)[0])
    pieces = []
    if any(narrow):
        # every narrow SVM's -gamma |x|^2 from ONE product of x^2 with a [D, SVMs] matrix of -gamma_j over the
        # columns SVM j reads, then spread over its support vectors' exponents by a Gather (a copy: exact)
        width = max(stop for _, stop, _ in square_columns)
        squares = np.zeros((width, len(square_columns)), dtype=np.float32)
        for k, (start, stop, value) in enumerate(square_columns):
            squares[start:stop, k] = value
        # [SVMs, their support vectors] of 0 and 1: row j has ones over SVM j's exponents, so the product copies
        # each SVM's row bias onto them exactly (1 * b plus zeros); onnxruntime's Gather along axis 1 cost 20x more
        spread = np.repeat(np.eye(len(square_rows), dtype=np.float32), square_rows, axis=1)
        narrow_ids = [j for j in order if narrow[j]]
        nodes += [
            n("Slice", [source, const("narrow/start", np.array([0], dtype=np.int64)),
                        const("narrow/stop", np.array([width], dtype=np.int64)), axis], [prefix + "narrow/x"]),
            n("Mul", [prefix + "narrow/x", prefix + "narrow/x"], [prefix + "narrow/x2"]),
            n("MatMul", [prefix + "narrow/x2", const("narrow/squares", squares)], [prefix + "narrow/row_bias"]),
            n("MatMul", [prefix + "narrow/row_bias", const("narrow/spread", spread)], [prefix + "narrow/row_biases"]),
            n("Concat", [exponents[j] for j in narrow_ids], [prefix + "narrow/cross"], axis=1),
            n("Add", [prefix + "narrow/cross", prefix + "narrow/row_biases"], [prefix + "narrow/partial"]),
            n("Add", [prefix + "narrow/partial",
                      const("narrow/sv_bias", np.concatenate([sv_bias[j] for j in narrow_ids])[None].astype(np.float32))],
              [prefix + "narrow/exponent32"]),
        ]
        pieces.append(prefix + "narrow/exponent32")
    wide_ids = [j for j in order if not narrow[j]]
    if wide_ids:
        nodes += [
            n("Concat", [exponents[j] for j in wide_ids], [prefix + "exponents"], axis=1),
            n("Add", [prefix + "exponents", const("sv_bias", np.concatenate([sv_bias[j] for j in wide_ids])[None])],
              [prefix + "exponent"]),
        ]
        if float32_exp:
            nodes.append(n("Cast", [prefix + "exponent"], [prefix + "wide/exponent32"], to=TensorProto.FLOAT))
            pieces.append(prefix + "wide/exponent32")
    duals = [duals[j] for j in order]
    intercepts = [intercepts[j] for j in range(len(fitted))]
    if not float32_exp:
        block = np.zeros((sum(len(d) for d in duals), len(columns)))
        row = 0
        for j, d in zip(order, duals):   # rows in the order the exponents are joined, column j = SVM j
            block[row : row + len(d), j] = d
            row += len(d)
        nodes += [
            n("Exp", [prefix + "exponent"], [prefix + "kernel"]),
            n("MatMul", [prefix + "kernel", const("dual", block)], [prefix + "weighted"]),            # [N, P]
        ]
    else:
        # one Exp and one product with a block matrix of dual coefficients per group (narrow, wide): each block
        # [its support vectors, its SVMs] instead of one [all, all] block, half of it zeros, in float64
        groups = [g for g in ([j for j in order if narrow[j]], wide_ids) if g]
        weighted, row = [], 0
        for k, (ids, piece) in enumerate(zip(groups, pieces)):
            rows = sum(len(duals[order.index(j)]) for j in ids)
            block = np.zeros((rows, len(ids)))
            r = 0
            for c, j in enumerate(ids):
                d = duals[order.index(j)]
                block[r : r + len(d), c] = d
                r += len(d)
            g = f"{prefix}group{k}/"
            nodes += [
                n("Exp", [piece], [g + "kernel32"]),
                n("Cast", [g + "kernel32"], [g + "kernel"], to=double),
                n("MatMul", [g + "kernel", const(f"group{k}/dual", block)], [g + "weighted"]),   # [N, len(ids)]
            ]
            weighted.append(g + "weighted")
        joined_ids = [j for ids in groups for j in ids]
        if len(weighted) == 1 and joined_ids == list(range(len(fitted))):
            nodes.append(n("Identity", weighted, [prefix + "weighted"]))
        else:
            nodes.append(n("Concat", weighted, [prefix + (
                "weighted" if joined_ids == list(range(len(fitted))) else "weighted_joined")], axis=1))
            if joined_ids != list(range(len(fitted))):   # back to SVM order: column j = SVM j
                nodes.append(n("Gather", [prefix + "weighted_joined",
                                          const("unjoin", np.argsort(joined_ids).astype(np.int64))],
                               [prefix + "weighted"], axis=1))
    nodes += [
        n("Add", [prefix + "weighted", const("intercept", np.array(intercepts))], [prefix + "decisions"]),
        n("Cast", [prefix + "decisions"], [output], to=TensorProto.FLOAT),
    ]
    return nodes, inits


def _decision(n, p: str, output: str) -> list:
    """From ``p + "dot"`` (x.sv) and ``p + "x_sq"`` (|x|^2), float64: the RBF kernel, the dual product and the
    intercept, reshaped to [N] and cast to float32 as ``output``."""
    return [
        n("Mul", [p + "dot", p + "two_gamma"], [p + "cross"]),              # [N, S]
        n("Mul", [p + "x_sq", p + "minus_gamma"], [p + "row_bias"]),       # [N, 1]
        n("Add", [p + "cross", p + "sv_bias"], [p + "partial"]),
        n("Add", [p + "partial", p + "row_bias"], [p + "exponent"]),
        n("Exp", [p + "exponent"], [p + "kernel"]),
        n("MatMul", [p + "kernel", p + "dual"], [p + "weighted"]),
        n("Add", [p + "weighted", p + "intercept"], [p + "decision"]),
        n("Reshape", [p + "decision", p + "flat"], [p + "flat_decision"]),
        n("Cast", [p + "flat_decision"], [output], to=TensorProto.FLOAT),
    ]
