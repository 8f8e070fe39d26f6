"""A classifier with its fitted methods and alarm policy: the Python side of the exported graph.

``HardenedModel.run`` computes exactly what the ONNX graph computes (torch
graph, then each scikit-learn detector, then the policy), so it is the
reference that export parity and tests compare onnxruntime against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from harden.graph.trace import input_node, output_node
from harden.io.lazy import LazyImages
from harden.methods.base import INPUT, LOGITS, FittedMethod
from harden.detectors.policy import AlarmPolicy, FiniteRows

LOGITS_OUTPUT = "logits"
RUN_BATCH = 4096   # rows of data read on demand that ``run`` holds at once
FINITE_OUTPUT = "input_finite"


def head_attr(method_name: str) -> str:
    return "harden_" + method_name.replace("-", "_").replace(".", "_")


def instrument_graph(classifier: fx.GraphModule, methods: list[FittedMethod],
                     head_dtype: torch.dtype | None = None) -> fx.GraphModule:
    """The classifier graph plus every method head; returns (logits, input_finite, *method outputs).

    The logits node is the classifier's own, untouched, so logits stay
    bit-identical to the input model's in eval mode.  ``head_dtype``: every head
    argument is cast to it first (a float64 classifier feeding the float32 heads).
    """
    gm = fx.GraphModule(classifier, copy.deepcopy(classifier.graph))
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    out = output_node(gm)
    logits = out.args[0]
    x = input_node(gm)
    order = {n: i for i, n in enumerate(graph.nodes)}

    gm.add_submodule("harden_finite", FiniteRows())
    with graph.inserting_after(x):
        finite = graph.call_module("harden_finite", (x,))
    outputs = [logits, finite]
    for method in methods:
        args = [x if a == INPUT else logits if a == LOGITS else nodes[a] for a in method.head_inputs]
        gm.add_submodule(head_attr(method.name), method.head)
        if head_dtype is not None:
            cast = []
            for a in args:
                with graph.inserting_after(a):
                    cast.append(graph.call_method("to", (a, head_dtype)))
                order[cast[-1]] = order.get(a, -1) + 0.5
            args = cast
        last = max(args, key=lambda n: order.get(n, -1))
        with graph.inserting_after(last):
            outputs.append(graph.call_module(head_attr(method.name), tuple(args)))
    graph.erase_node(out)
    graph.output(tuple(outputs))
    graph.lint()
    gm.recompile()
    return gm.eval()


@dataclass
class HardenedModel:
    classifier: fx.GraphModule
    methods: list[FittedMethod]
    policy: AlarmPolicy | None = None
    facts: dict[str, Any] = field(default_factory=dict)   # manifest material gathered by instrument
    original_state: dict[str, torch.Tensor] | None = None  # the user's weights when a method fine-tuned them

    golden: dict[str, np.ndarray] = field(default_factory=dict)  # reference outputs for export parity

    def __post_init__(self):
        self._graph: fx.GraphModule | None = None

    @property
    def graph(self) -> fx.GraphModule:
        if self._graph is None:
            self._graph = instrument_graph(self.classifier, self.methods)
        return self._graph

    def output_names(self) -> list[str]:
        return [LOGITS_OUTPUT, FINITE_OUTPUT] + [m.feature_output for m in self.methods]

    def policy_output_names(self) -> list[str]:
        names = ["score", "alarm"]
        for m in self.methods:
            names += [f"{m.name}.score", f"{m.name}.alarm"]
        return names

    @torch.no_grad()
    def torch_outputs(self, x: torch.Tensor, batch_size: int = 512, graph: fx.GraphModule | None = None
                      ) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        graph = graph if graph is not None else self.graph
        for start in range(0, len(x), batch_size):
            outs = graph(x[start : start + batch_size])
            for name, value in zip(self.output_names(), outs):
                parts.setdefault(name, []).append(value.detach().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def raw_scores(self, torch_out: dict[str, np.ndarray]) -> np.ndarray:
        """[N, M] raw scores: the head output itself, or the detector applied to the head's features."""
        columns = []
        for m in self.methods:
            feats = torch_out[m.feature_output]
            columns.append(m.detector.score(feats) if m.detector is not None else feats)
        return np.stack([np.asarray(c, dtype=np.float32).reshape(-1) for c in columns], axis=1)

    def run(self, x: torch.Tensor | np.ndarray, float64_classifier: bool = False) -> dict[str, np.ndarray]:
        """Every output of the ONNX contract, computed with torch and the detectors.

        ``float64_classifier``: the classifier runs in float64 (its heads and detectors as ever): how far that
        moves each output is what float32 rounding in the classifier does to it (export parity's tolerance).
        """
        if self.policy is None:
            raise RuntimeError("the model is not calibrated yet")
        if isinstance(x, LazyImages):   # data read on demand: a batch at a time
            parts = [self.run(batch) for batch in x.batches(RUN_BATCH)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else self.run(x[:0])
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if float64_classifier:
            graph = instrument_graph(copy.deepcopy(self.classifier).double(), self.methods, head_dtype=torch.float32)
            out = self.torch_outputs(x.double(), graph=graph)
        else:
            out = self.torch_outputs(x)
        raw = self.raw_scores(out)
        with torch.no_grad():
            policy_out = self.policy(torch.from_numpy(out[FINITE_OUTPUT]), *torch.from_numpy(raw).unbind(1))
        result = {LOGITS_OUTPUT: out[LOGITS_OUTPUT]}
        for name, value in zip(self.policy_output_names(), policy_out):
            result[name] = value.numpy()
        return result

    def method(self, name: str) -> FittedMethod:
        return next(m for m in self.methods if m.name == name)


def original_classifier(hardened: HardenedModel) -> fx.GraphModule:
    """The user's model before any fine-tuning (same graph, original weights)."""
    if hardened.original_state is None:
        return hardened.classifier
    original = copy.deepcopy(hardened.classifier)
    original.load_state_dict(hardened.original_state)
    return original
