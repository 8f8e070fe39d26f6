"""Interval bound propagation over an fx graph: one rule per canonical op, batched, differentiable.

``propagate(gm, box)`` runs the graph with :class:`Interval` values in place of
tensors.  A node whose arguments hold an interval goes to its rule in
:data:`BOUND_RULES`; a node with only concrete arguments (shape arithmetic,
weights, constants) runs as in the model.  Bounds live on the device of the
box (move the model there too) and are built from pure torch ops, so
``result.output.hi.sum().backward()`` reaches the weights.

Before anything runs, every node that depends on the input is checked once and
all the unsupported ones are reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

# Importing the rule families registers them.
from harden.bounds import activations, arith, attention, linear, norm, pooling, shape  # noqa: F401
from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, FRESH_OUTPUTS, Call
from harden.errors import HardenError, UnsupportedOpsError
from harden.graph.ops import canonical_op, op_spelling

STAGE = "interval bounds"


@dataclass
class BoundResult:
    output: Any                                  # an Interval for a classifier graph
    nodes: dict[str, Any] = field(default_factory=dict)   # recorded node name -> Interval (or concrete value)
    rules: set[str] = field(default_factory=set)          # canonical keys whose rule was applied

    def __getitem__(self, name: str):
        return self.nodes[name]


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the graph's input (the placeholders)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def supported(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Every node the propagator cannot bound, as (node name, op spelling); empty when the graph is supported.

    Only nodes that depend on the input need a rule: constant sub-graphs run as they are.
    """
    dependent = input_dependent(gm)
    problems = []
    for node in gm.graph.nodes:
        if node not in dependent or node.op in ("placeholder", "output"):
            continue
        key = canonical_op(gm, node)
        if key is None or key not in BOUND_RULES:
            problems.append((node.name, op_spelling(gm, node)))
    return problems


def check_supported(gm: fx.GraphModule) -> None:
    """Raise :class:`UnsupportedOpsError` naming every unsupported node at once."""
    problems = supported(gm)
    if problems:
        raise UnsupportedOpsError(STAGE, problems, BOUND_RULES.names())


def _holds_interval(value) -> bool:
    if isinstance(value, Interval):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_interval(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_interval(v) for v in value.values())
    return False


def _uses(value, node: fx.Node) -> int:
    if value is node:
        return 1
    if isinstance(value, (list, tuple)):
        return sum(_uses(v, node) for v in value)
    if isinstance(value, dict):
        return sum(_uses(v, node) for v in value.values())
    return 0


def _may_overwrite(gm: fx.GraphModule, keys: dict, keep: set[str]) -> set[fx.Node]:
    """Nodes that may overwrite their first input's bounds: the input is a fresh rule output read once,
    by this node only, and neither recorded nor clamped (``keep``)."""
    nodes = set()
    for node in gm.graph.nodes:
        if keys.get(node) not in FRESH_OUTPUTS or node.name in keep or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.args and user.args[0] is node and _uses(user.args, node) + _uses(user.kwargs, node) == 1:
            nodes.add(user)
    return nodes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _no_grad_needed(value) -> bool:
    if not isinstance(value, Interval):
        return False
    return not torch.is_grad_enabled() or not (value.lo.requires_grad or value.hi.requires_grad)


class IntervalInterpreter(fx.Interpreter):
    """An fx.Interpreter whose values may be Intervals; rules come from BOUND_RULES by canonical op."""

    def __init__(self, gm: fx.GraphModule, record: Iterable[str] | None = None,
                 clamp: dict[str, Callable[[Interval], Interval]] | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.keys = {n: canonical_op(gm, n) for n in gm.graph.nodes}
        self.record = set(record or ())
        self.clamp = dict(clamp or {})
        self.recorded: dict[str, Any] = {}
        self.rules_used: set[str] = set()
        self.may_overwrite = _may_overwrite(gm, self.keys, self.record | set(self.clamp))

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "get_attr", "output"):
            result = super().run_node(n)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            try:
                if _holds_interval(args) or _holds_interval(kwargs):
                    key = self.keys[n]
                    module = self.fetch_attr(n.target) if n.op == "call_module" else None
                    owned = n in self.may_overwrite and _no_grad_needed(args[0])
                    result = BOUND_RULES.get(key)(Call(self.module, n, key, tuple(args), dict(kwargs), module, owned))
                    self.rules_used.add(key)
                else:
                    result = getattr(self, n.op)(n.target, args, kwargs)
            except HardenError:
                raise
            except Exception as exc:
                raise HardenError(f"bounds: node {n.name!r} ({op_spelling(self.module, n)}) failed: "
                                  f"{_first_line(exc)}") from exc
        if n.name in self.clamp:
            result = self.clamp[n.name](result)
        if n.name in self.record:
            self.recorded[n.name] = result
        return result


def propagate(gm: fx.GraphModule, box: Interval, *, record: Iterable[str] | None = None,
              clamp: dict[str, Callable[[Interval], Interval]] | None = None) -> BoundResult:
    """Bounds of every value of ``gm`` over the input box (batched: one box per sample).

    ``record`` names nodes whose bounds to keep; ``clamp`` maps a node name to a
    function applied to its interval right after it is computed (what later
    nodes see, and what is recorded).
    """
    if not isinstance(box, Interval):
        raise HardenError(f"propagate needs an Interval input box, got {type(box).__name__}")
    check_supported(gm)
    names = {n.name for n in gm.graph.nodes}
    unknown = sorted(set(record or ()) - names) + sorted(set(clamp or ()) - names)
    if unknown:
        raise HardenError(f"bounds: no node named {', '.join(map(repr, unknown))} in the graph")
    interpreter = IntervalInterpreter(gm, record, clamp)
    output = interpreter.run(box)
    return BoundResult(output, interpreter.recorded, interpreter.rules_used)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record: Iterable[str]):
        super().__init__(gm, garbage_collect_values=True)
        self.record = set(record)
        self.recorded: dict[str, Any] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.name in self.record:
            self.recorded[n.name] = result
        return result


def run_recorded(gm: fx.GraphModule, x: torch.Tensor, record: Iterable[str]) -> tuple[Any, dict[str, Any]]:
    """The real model's output on ``x`` and the real values of the recorded nodes."""
    recorder = _Recorder(gm, record)
    output = recorder.run(x)
    return output, recorder.recorded
