"""Which in-place ATen ops of a torch.export graph can be rewritten out of place by renaming them.

``aten.foo_.overload`` -> ``aten.foo.overload`` is the same computation unless the mutated tensor is a view whose
base (or another view of it) is read after the mutation: the in-place op changes the base there, an
out-of-place one would not.  Such graphs go through torch.export's functionalisation instead (slower).
"""

from __future__ import annotations

import torch
import torch.fx as fx


def is_view(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None for r in target._schema.returns)


def mutates_a_base_read_later(node: fx.Node) -> bool:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    chain, current = set(), node.args[0] if node.args else None
    while isinstance(current, fx.Node) and is_view(current):
        chain.add(current)
        current = current.args[0] if current.args else None
        if isinstance(current, fx.Node) and any(order[u] > order[node] for u in current.users if u not in chain):
            return True
    return False


def out_of_place(node: fx.Node):
    """The out-of-place ATen overload that may replace this in-place one, or None."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or not op._schema.is_mutable:
        return None
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or mutates_a_base_read_later(node):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def needs_functionalisation(graph: fx.Graph) -> bool:
    """True when some mutating op has no safe out-of-place rename."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               and out_of_place(n) is None for n in graph.nodes)
