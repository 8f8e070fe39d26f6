"""Graph copies the fine-tuning losses run on: where a site's pre-activation is, and the graph cut at given nodes."""

from __future__ import annotations

import torch.fx as fx

from harden.graph.ops import canonical_op


# Sites whose activation f satisfies f(z) > T <=> z > T for the small T >= 0 the traps use: their losses and
# thresholds are taken on the pre-activation z, whose bounds carry gradient where f's own lower bound is flat at 0.
_ON_PRE_ACTIVATION = frozenset({"relu", "relu6"})


def pre_activation(gm: fx.GraphModule, site: str) -> str:
    """The node a site's traps are trained and thresholded on: a ReLU's (or ReLU6's) input, where the comparison
    with T is the same and the bounds keep a gradient; any other activation's own output (GELU, SiLU, a sigmoid
    gate: f(z) > T holds above some other z, so thresholds are compared where the exported check compares)."""
    node = next(n for n in gm.graph.nodes if n.name == site)
    if canonical_op(gm, node) not in _ON_PRE_ACTIVATION:
        return node.name
    return node.all_input_nodes[0].name


def bounds_graph(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of ``gm`` that stops at ``names`` and returns them as a tuple: bounds are never propagated past
    the last trap (the classifier's later layers cost time and carry no gradient to the CTT losses).
    Parameters are shared with ``gm``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    wanted = set(names)
    copied: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        copied[node.name] = env[node]
        if wanted <= copied.keys():
            break
    graph.output(tuple(copied[n] for n in names))
    truncated = fx.GraphModule(gm, graph)
    truncated.graph.eliminate_dead_code()  # needs the owning module for its purity check
    truncated.recompile()
    return truncated
