"""Turn a classifier into a clean torch.fx GraphModule: one tensor in, one logits tensor out.

In-place operations are rewritten out of place (later readers of the mutated
value are redirected to the new node), so inserted detectors read the value a
site really had and fine-tuning can back-propagate.  Optional forward
arguments are bound to their defaults; run-time assertions and eval-mode
identities (stochastic depth) are dropped; member names that are not
identifiers (RegNet's ``block1-0``) are renamed, the original module path
staying in each node's ``nn_module_stack``.  Finally the graph must be one a
bundle can store (:mod:`harden.graph.graphfile`), so that a model harden
cannot ship is refused here, before any fitting.
"""

from __future__ import annotations

import copy
import inspect
import operator
import re

import torch
import torch.fx as fx
import torch.nn as nn

from harden.core.inplace import out_of_place
from harden.errors import HardenError
from harden.graph.ops import OUT_OF_PLACE_FUNCTIONS, canonical_op, eval_identity_input, is_assertion, is_inplace


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


def _optional_arguments(model: nn.Module) -> dict:
    """forward's parameters after the input that have defaults, bound to them (timm's ``attn_mask=None``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    plain = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in plain[1:] if p.default is not p.empty}


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model, concrete_args=_optional_arguments(model) or None)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        where = tracer.current_path or type(model).__name__
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HardenError(
            f"torch.fx cannot trace the model at node {where!r}: {first_line}. "
            "Export it with torch.export and pass the .pt2 file instead."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_bound_arguments(gm)
    return gm


def _drop_bound_arguments(gm: fx.GraphModule) -> None:
    """The placeholders of arguments bound by concrete_args, and fx's checks that they keep their value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none" \
                    and not user.users:
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)


def _drop_checks_and_identities(gm: fx.GraphModule) -> None:
    """Run-time assertions go (with the comparisons only they read); eval-mode identities become their input."""
    for node in list(gm.graph.nodes):
        if is_assertion(node) and not node.users:
            gm.graph.erase_node(node)
            continue
        source = eval_identity_input(node)
        if source is not None:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    _erase_dead_values(gm)


def _erase_dead_values(gm: fx.GraphModule) -> None:
    """Unused pure nodes (what assertions compared), latest first; modules and placeholders stay."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "call_method") and not node.users and not is_inplace(gm, node):
            gm.graph.erase_node(node)


_MEMBER = re.compile(r"^[A-Za-z0-9_]+$")


def _rename_members(gm: fx.GraphModule) -> None:
    """Members (sub-modules, parameters, buffers) whose names are not identifiers or numbers get ones that are;
    node targets follow.  The module path a user knows stays in each node's ``nn_module_stack``."""
    paths: dict[str, str] = {}   # old qualified name -> new, for every member

    def walk(module: nn.Module, old: str, new: str) -> None:
        children = []
        for table in (module._modules, module._parameters, module._buffers):
            items = list(table.items())
            table.clear()   # refilled in the same order, renamed where needed
            for name, value in items:
                fresh = name
                if not _MEMBER.match(name):
                    fresh = re.sub(r"[^A-Za-z0-9_]", "_", name)
                    taken = {n for n, _ in items} | set(module._modules) | set(module._parameters) \
                        | set(module._buffers)
                    while fresh in taken or hasattr(type(module), fresh) or fresh in module.__dict__:
                        fresh += "_"
                    if name in module._non_persistent_buffers_set:
                        module._non_persistent_buffers_set.discard(name)
                        module._non_persistent_buffers_set.add(fresh)
                table[fresh] = value
                paths[old + name] = new + fresh
                if table is module._modules and value is not None:
                    children.append((name, fresh, value))
        for name, fresh, child in children:
            walk(child, f"{old}{name}.", f"{new}{fresh}.")

    walk(gm, "", "")
    if all(k == v for k, v in paths.items()):
        return
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = paths.get(str(node.target), node.target)


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


def _plain_batch_norm(gm: fx.GraphModule) -> None:
    """torch.export's functional form of an eval batch norm, ``_native_batch_norm_legit_no_training(...)[0]``, as
    the one-output ``aten.batch_norm`` it came from (the same kernel): every stage then reads one spelling."""
    legit = torch.ops.aten._native_batch_norm_legit_no_training.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not legit or node.kwargs or len(node.args) != 7:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        x, weight, bias, mean, var, momentum, eps = node.args
        with gm.graph.inserting_before(node):
            plain = gm.graph.call_function(torch.ops.aten.batch_norm.default,
                                           (x, weight, bias, mean, var, False, momentum, eps, False))
        plain.meta = dict(node.meta)
        for user in users:
            user.replace_all_uses_with(plain)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)


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
        elif isinstance(node.target, torch._ops.OpOverload):
            replacement = out_of_place(node)
            if replacement is None:
                raise HardenError(f"cannot rewrite in-place node {node.name!r} out of place (it writes into a view "
                                  "whose base is read later); load the program with harden.load_model, which "
                                  "functionalises it")
            node.target = replacement
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
        _plain_batch_norm(gm)
    elif isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    else:
        gm = _symbolic_trace(model)
    _drop_checks_and_identities(gm)
    _check_single_io(gm)
    _functionalise(gm)
    _rename_members(gm)
    gm.graph.lint()
    gm.recompile()
    gm.training = False
    for sub in gm.modules():
        sub.training = False
    _check_storable(gm)
    return gm


def _check_storable(gm: fx.GraphModule) -> None:
    """A bundle stores the classifier as a harden graph file: refuse what it cannot hold now, before any fitting."""
    from harden.graph.graphfile import graph_to_json

    try:
        graph_to_json(gm)
    except HardenError as exc:
        exported = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                       for n in gm.graph.nodes)
        hint = "" if exported else "; export the model with torch.export and pass the .pt2 file instead"
        raise HardenError(f"{exc}{hint}") from None


def sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose output is an element-wise activation (any spelling): see harden.graph.ops.SITE_OPS."""
    from harden.graph.ops import SITE_OPS

    return [n for n in gm.graph.nodes if canonical_op(gm, n) in SITE_OPS]


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    """(module path, class name) of the innermost module the node ran in, as tracing recorded it."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return str(path), name


_CONTAINERS = ("torch.nn.modules.container.",)


def module_path(node: fx.Node) -> str:
    """The qualified module path of a module's own op (``layer1.0.relu``: the user's name, before any renaming,
    in a torch.export program too), else the node name."""
    inner = _innermost(node)
    if inner is not None and inner[0] and inner[1].startswith("torch.nn.modules.") \
            and not inner[1].startswith(_CONTAINERS):
        return inner[0]
    return str(node.target) if node.op == "call_module" else node.name


def site_keys(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[str, str]:
    """Node name -> a key both forms of a model share (state_dict + --arch traced by torch.fx, and torch.export):
    the innermost module path, the canonical op and the node's position among the graph's nodes of that path and
    op (``layer1.0.relu/relu/1``: the second call of a ReLU module).  Node names differ between the forms."""
    wanted = {n.name for n in nodes}
    counts: dict[tuple[str, str], int] = {}
    keys = {}
    for node in gm.graph.nodes:
        op = canonical_op(gm, node)
        if op is None or node.op in ("placeholder", "output", "get_attr"):
            continue
        inner = _innermost(node)
        path = inner[0] if inner is not None else (str(node.target) if node.op == "call_module" else "")
        position = counts.get((path, op), 0)
        counts[(path, op)] = position + 1
        if node.name in wanted:
            keys[node.name] = f"{path or '<root>'}/{op}/{position}"
    return keys


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def input_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")
