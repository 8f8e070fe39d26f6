"""One ONNX graph for a composite detector: column slices -> one-class estimators -> a final estimator per set,
then an order statistic across sets.

Layout of the graph built by :func:`build_composite`, per set k::

    features [N, D] --(each part: columns [start, stop) -> sign * decision)--> scores [N, n] --final--> r_k [N]
    (several sets)   (r_k - loc_k) / spread_k --Unsqueeze--Concat--> [N, K] --TopK(m)--> [:, m-1] --> raw [N]

With one set and no normalisation, ``raw = r_1``.  Every internal name is prefixed per set and estimator, so
sub-graphs cannot collide.

How the estimators are written is a *kernel* of :data:`KERNELS`:

* ``dense`` (the default): the RBF one-class SVMs as float64 ONNX algebra (:mod:`harden.detectors.dense_rbf`;
  the exponents of the SVMs without a scaler, the value invariants, in float32), every part of a set in one
  block (one Exp over the parts' kernels and one MatMul with their dual coefficients per group).  The issue asked for skl2onnx in float32; this deliberately deviates: within ~1e-6 of
  scikit-learn instead of ~1e-5, and a fraction of the cost (onnxruntime's SVM operator loops over
  (input, support vector) pairs).  Measured on LeNet-5.
* ``skl2onnx``: each estimator converted by skl2onnx (``ai.onnx.ml`` SVM operator, float32); kept to compare.

Between the stages the scores are float32, exactly as :class:`harden.methods.nic.NICDetector` rounds them, so
the graph and scikit-learn see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.detectors.dense_rbf import rbf_decisions_graph
from harden.detectors.sklearn_onnx import convert
from harden.core.opsets import IR_VERSION, OPSET


@dataclass
class Part:
    """A fitted estimator reading columns ``[start, stop)`` of its input; its score is ``sign * decision``."""

    estimator: object
    start: int
    stop: int
    sign: float = -1.0


@dataclass
class SetSpec:
    parts: list[Part]
    final: object                 # reads the [N, len(parts)] matrix of the parts' scores
    final_sign: float = -1.0
    loc: float = 0.0              # the set's raw score is (sign * final decision - loc) / spread
    spread: float = 1.0


@dataclass
class _Builder:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    opsets: dict = field(default_factory=dict)

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output + "/node", **attrs))
        return output

    def estimator(self, kernel: str, estimator, prefix: str, source: str, n_features: int, sign: float) -> str:
        """Emit ``sign * decision(estimator)`` fed by ``source`` with ``kernel``; returns its [N] output name."""
        KERNELS[kernel].one(self, estimator, prefix, source, n_features, sign)
        return prefix + "out"

    def parts(self, kernel: str, parts: list[Part], source: str, prefix: str) -> str:
        """Emit every part's oriented score as one [N, len(parts)] float32 matrix; returns its name."""
        return KERNELS[kernel].parts(self, parts, source, prefix)


def _dense_one(b: _Builder, estimator, prefix: str, source: str, n_features: int, sign: float) -> None:
    # the same graph as a set's parts, with one column (scaler folded, float32 Exp), flattened to [N]
    nodes, inits = rbf_decisions_graph([(estimator, 0, n_features, sign)], source, prefix + "column", prefix,
                                       float32_exp=FLOAT32_EXP)
    b.nodes.extend(nodes)
    b.inits.extend(inits)
    b.const(prefix + "flat", np.array([-1], dtype=np.int64))
    b.node("Reshape", [prefix + "column", prefix + "flat"], prefix + "out")


FLOAT32_EXP = True


def _dense_parts(b: _Builder, parts: list[Part], source: str, prefix: str) -> str:
    nodes, inits = rbf_decisions_graph([(p.estimator, p.start, p.stop, p.sign) for p in parts], source,
                                       prefix + "scores", prefix, float32_exp=FLOAT32_EXP)
    b.nodes.extend(nodes)
    b.inits.extend(inits)
    return prefix + "scores"


def _skl2onnx_one(b: _Builder, estimator, prefix: str, source: str, n_features: int, sign: float) -> None:
    sub = convert(estimator, "in", "out", n_features, column=None, sign=sign)
    sub = onnx.compose.add_prefix(sub, prefix)
    for entry in sub.opset_import:
        b.opsets[entry.domain] = max(b.opsets.get(entry.domain, 0), entry.version)
    b.node("Identity", [source], prefix + "in")
    b.nodes.extend(sub.graph.node)
    b.inits.extend(sub.graph.initializer)


def _skl2onnx_parts(b: _Builder, parts: list[Part], source: str, prefix: str) -> str:
    columns = []
    for j, part in enumerate(parts):
        p = f"{prefix}part{j}/"
        b.const(p + "starts", np.array([part.start], dtype=np.int64))
        b.const(p + "stops", np.array([part.stop], dtype=np.int64))
        sliced = b.node("Slice", [source, p + "starts", p + "stops", "axis1"], p + "columns")
        score = b.estimator("skl2onnx", part.estimator, p + "est/", sliced, part.stop - part.start, part.sign)
        columns.append(b.node("Unsqueeze", [score, "axis1"], p + "column"))
    return b.node("Concat", columns, prefix + "scores", axis=1)


@dataclass(frozen=True)
class Kernel:
    one: object     # (builder, estimator, prefix, source, n_features, sign) -> emits prefix + "out" [N]
    parts: object   # (builder, parts, source, prefix) -> name of the [N, len(parts)] score matrix


KERNELS = {"dense": Kernel(_dense_one, _dense_parts), "skl2onnx": Kernel(_skl2onnx_one, _skl2onnx_parts)}


def build_composite(input_name: str, output_name: str, n_features: int, sets: list[SetSpec],
                    vote: int | None = None, kernel: str = "dense") -> onnx.ModelProto:
    """``vote`` = m: the raw score is the m-th largest normalised set score (None: the only set's score)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    if vote is None and len(sets) != 1:
        raise ValueError("several sets need a vote (the order statistic to take)")
    b = _Builder()
    b.const("axis1", np.array([1], dtype=np.int64))
    set_outputs = []
    for k, spec in enumerate(sets):
        matrix = b.parts(kernel, spec.parts, input_name, f"set{k}/")
        raw = b.estimator(kernel, spec.final, f"set{k}/final/", matrix, len(spec.parts), spec.final_sign)
        if vote is not None:
            b.const(f"set{k}/loc", np.array(spec.loc, dtype=np.float32))
            b.const(f"set{k}/spread", np.array(spec.spread, dtype=np.float32))
            centred = b.node("Sub", [raw, f"set{k}/loc"], f"set{k}/centred")
            raw = b.node("Div", [centred, f"set{k}/spread"], f"set{k}/normalised")
        set_outputs.append(raw)
    if vote is None:
        b.node("Identity", [set_outputs[0]], output_name)
    else:
        columns = [b.node("Unsqueeze", [r, "axis1"], f"vote/column{k}") for k, r in enumerate(set_outputs)]
        stacked = b.node("Concat", columns, "vote/sets", axis=1)
        b.const("vote/k", np.array([vote], dtype=np.int64))
        b.nodes.append(helper.make_node("TopK", [stacked, "vote/k"], ["vote/top", "vote/top_index"],
                                        name="vote/topk", axis=1, largest=1, sorted=1))
        b.const("vote/last", np.array(vote - 1, dtype=np.int64))
        b.node("Gather", ["vote/top", "vote/last"], output_name, axis=1)
    b.opsets[""] = max(b.opsets.get("", 0), OPSET)
    graph = helper.make_graph(
        b.nodes, "composite_detector",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(b.opsets.items())],
                              producer_name="harden")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
