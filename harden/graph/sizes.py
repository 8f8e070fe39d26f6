"""How large every tensor a graph computes will be, found on the meta device before anything runs for real.

A graph from a file can ask for tensors of any size (``aten.full([3e8])``, a padding of a million, an
upsampling by a thousand).  :func:`check_sizes` runs the graph on torch's ``meta`` device, where tensors have
shapes but no memory, with the parameters and constants swapped for meta copies, and refuses the graph when
one tensor would exceed :data:`harden.core.limits.MAX_TENSOR_ELEMENTS`.  Only then may it run on real data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.overrides
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from harden.core.limits import MAX_TENSOR_ELEMENTS, MAX_TOTAL_ELEMENTS
from harden.errors import HardenError

META = torch.device("meta")


def _to_meta(value: Any) -> Any:
    return value.to(META) if isinstance(value, torch.Tensor) else value


class _MetaRunner(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, cap: int, where: str):
        super().__init__(gm, garbage_collect_values=True)
        self.cap = cap
        self.where = where

    def get_attr(self, target, args, kwargs):
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        state = {name: _to_meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
        return functional_call(module, state, tuple(args), dict(kwargs))

    def run_node(self, node: fx.Node) -> Any:
        try:
            out = super().run_node(node)
        except HardenError:
            raise
        except Exception as exc:  # noqa: BLE001 - a node that cannot run on meta cannot be bounded ahead of time
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise HardenError(f"{self.where}: node {node.name!r} fails on the input shape: {text}") from None
        for tensor in _tensors(out):
            if tensor.numel() > self.cap:
                raise HardenError(f"{self.where}: node {node.name!r} would create a tensor of shape "
                                  f"{list(tensor.shape)} ({tensor.numel():,} elements, above the cap of {self.cap:,})")
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def check_sizes(gm: fx.GraphModule, example_shape: tuple[int, ...], where: str = "graph",
                cap: int = MAX_TENSOR_ELEMENTS) -> Any:
    """Run ``gm`` on a meta tensor of ``example_shape``; refuse (one line) any tensor above ``cap`` elements.

    Returns the meta output, so that callers can check its shape against what they expect.
    """
    if not isinstance(gm, fx.GraphModule):
        raise HardenError(f"{where}: expected a torch.fx GraphModule, got {type(gm).__name__}")
    try:
        with torch.device(META), torch.no_grad():   # factory functions inside the graph create meta tensors too
            return _MetaRunner(gm, cap, where).run(torch.empty(example_shape, device=META))
    except HardenError as exc:  # fx appends "While executing ..." lines to what a node raised: keep the first
        raise HardenError(str(exc).strip().splitlines()[0]) from None


def check_module_sizes(module: nn.Module, where: str, cap: int = MAX_TENSOR_ELEMENTS) -> int:
    """The element count of every parameter and buffer of ``module`` (built on meta), each within ``cap``."""
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.numel() > cap:
            raise HardenError(f"{where}: tensor {name!r} of shape {list(tensor.shape)} is above the cap of {cap:,} elements")
        total += tensor.numel()
    return total


class CreationBudget(torch.overrides.TorchFunctionMode):
    """While active, every tensor a torch function returns counts against a budget (count and elements).

    Building a head from a bundle's config runs the head's constructor; a config can ask it to loop a
    billion times.  On the meta device the tensors cost no memory, and this budget stops the loop early.
    """

    def __init__(self, where: str, max_tensors: int = 100_000, max_elements: int = MAX_TOTAL_ELEMENTS):
        super().__init__()
        self.where, self.max_tensors, self.max_elements = where, max_tensors, max_elements
        self.tensors = self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in _tensors(result):
            self.tensors += 1
            self.elements += tensor.numel()
            if tensor.numel() > MAX_TENSOR_ELEMENTS or self.tensors > self.max_tensors \
                    or self.elements > self.max_elements:
                raise HardenError(f"{self.where}: building it would create more than {self.max_tensors:,} tensors "
                                  f"or {self.max_elements:,} elements (a tensor of shape {list(tensor.shape)})")
        return result
