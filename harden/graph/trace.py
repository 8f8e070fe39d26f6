"""Turn a classifier into a clean torch.fx GraphModule: one tensor in, one logits tensor out.

In-place operations are rewritten out of place (later readers of the mutated
value are redirected to the new node), so inserted detectors read the value a
site really had and fine-tuning can back-propagate.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from harden.errors import HardenError
from harden.graph.ops import OUT_OF_PLACE_FUNCTIONS, canonical_op, is_inplace


class _PathTracer(fx.Tracer):
    """A tracer that remembers the module it was in when tracing failed."""

    def __init__(self):
        super().__init__()
        self.current_path = ""

    def call_module(self, m, forward, args, kwargs):
        previous = self.current_path
        self.current_path = self.path_of_module(m)
        # On failure current_path is left at the innermost module, which the error names.
        result = super().call_module(m, forward, args, kwargs)
        self.current_path = previous
        return result


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        where = tracer.current_path or type(model).__name__
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HardenError(
            f"torch.fx cannot trace the model at node {where!r}: {first_line}. "
            "Export it with torch.export and pass the .pt2 file instead."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _clean_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain-codegen copy of ``ExportedProgram.module()``: no pytree specs, no guard calls."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue
        if node.op == "call_function" and "assert" in str(node.target):
            continue
        if node.op == "output":
            result = node.args[0]
            if isinstance(result, (tuple, list)) and len(result) == 1:
                result = result[0]  # torch.export flattens outputs into a tuple
            graph.output(fx.map_arg(result, lambda n: env[n]))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph, "ExportedClassifier")


def _functionalise(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if not is_inplace(gm, node):
            continue
        mutated = node.args[0] if node.args else None
        if node.op == "call_module":
            module = copy.deepcopy(gm.get_submodule(node.target))
            module.inplace = False
            _replace_submodule(gm, node.target, module)
        elif node.op == "call_method":
            node.target = str(node.target)[:-1]
        elif node.target in OUT_OF_PLACE_FUNCTIONS:
            node.target = OUT_OF_PLACE_FUNCTIONS[node.target]
        elif "inplace" in node.kwargs:
            node.kwargs = {**node.kwargs, "inplace": False}
        else:
            raise HardenError(f"cannot rewrite in-place node {node.name!r} out of place")
        if isinstance(mutated, fx.Node):
            _redirect_later_uses(gm.graph, mutated, node)


def _redirect_later_uses(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(old.users):
        if user is not new and order[user] > order[new]:
            user.replace_input_with(old, new)


def _replace_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_path, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _check_single_io(gm: fx.GraphModule) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise HardenError(f"the model must take one input tensor; its forward takes {len(placeholders)}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise HardenError("the model must return one logits tensor, not a tuple, list or dict")


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a clean, functional, eval-mode GraphModule."""
    if not isinstance(model, fx.GraphModule):
        model = model.eval()
    if isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes
    ):
        gm = _clean_exported(model)
    elif isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    else:
        gm = _symbolic_trace(model)
    _check_single_io(gm)
    _functionalise(gm)
    gm.graph.lint()
    gm.recompile()
    gm.training = False
    for sub in gm.modules():
        sub.training = False
    return gm


def sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose output is a rectified activation (ReLU or ReLU6, any spelling)."""
    from harden.graph.ops import SITE_OPS

    return [n for n in gm.graph.nodes if canonical_op(gm, n) in SITE_OPS]


def module_path(node: fx.Node) -> str:
    """The qualified module path of a module call, else the node name."""
    return str(node.target) if node.op == "call_module" else node.name


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def input_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")
