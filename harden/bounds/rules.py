"""The bound-rule registry and the one way a rule reads its parameters, whatever the node's spelling.

A rule is a function ``rule(call: Call) -> value`` registered under a canonical
op key (see :mod:`harden.graph.ops`).  It asks ``call.bind(SIGNATURE,
from_module=...)`` for its parameters and gets the same dict whether the node
is an ``nn.Module`` call (parameters read from the module), a ``torch`` /
``torch.nn.functional`` function (positional args, keywords and defaults), a
tensor method (``self`` is the first parameter) or an ATen overload from a
``torch.export`` graph (positional per the ATen schema; weights arrive as
concrete tensors from ``get_attr`` nodes).

The propagator only calls a rule when at least one argument is an
:class:`~harden.bounds.interval.Interval`; everything else (shape arithmetic,
constant tensors) is evaluated concretely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from harden.bounds.interval import Interval
from harden.errors import HardenError
from harden.core.registry import Registry

BoundRule = Callable[["Call"], Any]

BOUND_RULES: Registry[BoundRule] = Registry("bound rule")

FRESH_OUTPUTS: set[str] = set()
"""Keys whose rule always returns newly allocated, distinct lo and hi tensors (never a view of an input).

When such a node's only reader is the next node, that reader may work in place on the bounds
(``Call.owned``): under ``torch.no_grad`` this saves an allocation per activation, which is most
of the cost of the element-wise rules.
"""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

Signature = Sequence[tuple[str, Any]]
"""(name, default) pairs in positional order; a name starting with '*' collects the remaining positional args."""


@dataclass
class Call:
    """One node being bounded: its evaluated arguments and, for a module call, the module."""

    gm: fx.GraphModule
    node: fx.Node
    key: str
    args: tuple
    kwargs: dict
    module: nn.Module | None = None
    owned: bool = False
    """True when the rule may overwrite its first input's bounds in place: no gradient is being recorded
    and the propagator proved that nothing else reads them (see ``FRESH_OUTPUTS``)."""

    @property
    def target(self):
        return self.node.target

    @property
    def is_aten(self) -> bool:
        return isinstance(self.node.target, torch._ops.OpOverload)

    @property
    def first_input(self):
        """The operand every spelling passes first: positional 0, or keyword ``input`` / ``self``."""
        if self.args:
            return self.args[0]
        for name in ("input", "self"):
            if name in self.kwargs:
                return self.kwargs[name]
        raise self.fail("no input argument")

    def fail(self, message: str) -> HardenError:
        return HardenError(f"bounds: node {self.node.name!r} ({self.key}): {message}")

    def bind(self, signature: Signature, from_module: Callable[[nn.Module], dict] | None = None) -> dict:
        """The node's parameters by name, defaults filled in.

        For a module call the positional arguments of ``forward`` fill the
        signature first and ``from_module(module)`` supplies the rest.  Keyword
        ``self`` (ATen schemas) is the first parameter.  An unknown keyword is an
        error: silently dropping a parameter could make a bound unsound.
        """
        names = [name for name, _ in signature]
        plain = [name.lstrip("*") for name in names]
        values: dict[str, Any] = {}
        args = list(self.args)
        for i, name in enumerate(names):
            if not args:
                break
            if name.startswith("*"):
                rest = args
                values[name[1:]] = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)) else tuple(rest)
                args = []
                break
            values[name] = args.pop(0)
        if args:
            raise self.fail(f"{len(self.args)} positional arguments; expected at most {len(names)} ({', '.join(plain)})")
        for name, value in self.kwargs.items():
            name = plain[0] if name == "self" else name
            if name not in plain:
                raise self.fail(f"unexpected keyword {name!r}; known: {', '.join(plain)}")
            values[name] = value
        if self.module is not None:
            if from_module is None:
                raise self.fail(f"no parameter reader for module {type(self.module).__name__}")
            values.update(from_module(self.module))
        for name, default in signature:
            name = name.lstrip("*")
            if name not in values:
                if default is REQUIRED:
                    raise self.fail(f"missing argument {name!r}")
                values[name] = default
        return values


def interval_arg(call: Call, value, what: str) -> Interval:
    if not isinstance(value, Interval):
        raise call.fail(f"expected bounds for {what}, got {type(value).__name__}")
    return value


def concrete_arg(call: Call, value, what: str):
    """A parameter that must not depend on the model input (weights, shapes, constants)."""
    if isinstance(value, Interval):
        raise call.fail(f"{what} depends on the model input; only constant {what} is supported")
    if isinstance(value, (list, tuple)) and any(isinstance(v, Interval) for v in value):
        raise call.fail(f"{what} depends on the model input; only constant {what} is supported")
    return value


def replay(call: Call, value: Interval) -> Callable[[torch.Tensor], Any]:
    """The node's own op as a function of a tensor standing where ``value`` (one of its interval arguments) was:
    what the rules of ops that only move, copy or select entries run on end points or back-propagate through."""
    node = call.node

    def run(t: torch.Tensor):
        args = tuple(t if a is value else a for a in call.args)
        kwargs = {k: (t if v is value else v) for k, v in call.kwargs.items()}
        if node.op == "call_module":
            return call.module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    return run
