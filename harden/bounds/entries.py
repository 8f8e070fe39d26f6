"""The start of a neuron's backward pass, one coefficient per row until a mixing layer writes its weights.

A pass that refines neuron j of a node starts from the one-hot row e_j.  Through per-element ops (batch
norm, ReLU, a residual add) it stays one entry per row, at the same flat position; as a dense tensor every
such step would touch the whole map, and the first convolution would run a transposed convolution of a
one-hot map (on a ResNet, one of the d convolutions of a pass from depth d).  Here the entry is carried as
(position, coefficient) and a linear layer or convolution with a ``start`` rule writes its weight row for it.
Same relaxations as the dense rules, so the same bounds (tests compare them).
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from harden.bounds.backward import BACKWARD_RULES, Back
from harden.bounds.backward_activations import relu_relaxation
from harden.bounds.backward_affine import _BINARY, batch_norm_affine
from harden.bounds.interval import Interval
from harden.errors import HardenError


class Entry:
    """Coefficient ``coef[r]`` on flat position ``neuron[r]`` (per sample, of a value of shape ``shape``), 0 elsewhere."""

    __slots__ = ("neuron", "coef", "shape")

    def __init__(self, neuron: torch.Tensor, coef: torch.Tensor, shape: tuple[int, ...]):
        self.neuron, self.coef, self.shape = neuron, coef, tuple(shape)

    def dense(self) -> torch.Tensor:
        rows = self.neuron.shape[0]
        A = torch.zeros((rows, int(torch.Size(self.shape).numel())), dtype=self.coef.dtype, device=self.coef.device)
        A.scatter_(1, self.neuron.unsqueeze(1), self.coef.unsqueeze(1))
        return A.reshape((rows,) + self.shape)

    def at(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """t[rows[r], neuron[r]] for a per-sample tensor t [N, *shape]."""
        return t.reshape(t.shape[0], -1)[rows, self.neuron]

    def box_lower(self, iv: Interval, rows: torch.Tensor) -> torch.Tensor:
        return self.coef.clamp(min=0) * self.at(iv.lo, rows) + self.coef.clamp(max=0) * self.at(iv.hi, rows)

    def scaled(self, factor: torch.Tensor | float) -> "Entry":
        return Entry(self.neuron, self.coef * factor, self.shape)


def add(a, b):
    """Sum of two coefficient sets on one value (Entry or dense tensor): entries of one pass share positions."""
    if isinstance(a, Entry) and isinstance(b, Entry) and a.shape == b.shape \
            and (a.neuron is b.neuron or torch.equal(a.neuron, b.neuron)):
        return Entry(a.neuron, a.coef + b.coef, a.shape)
    return dense(a) + dense(b)


def dense(A):
    if isinstance(A, Entry):
        return A.dense()
    if isinstance(A, dict):
        return {k: dense(v) for k, v in A.items()}
    return A


def _same_shape(v, shape) -> bool:
    return isinstance(v, Interval) and tuple(v.shape[1:]) == shape


def step(engine, node: fx.Node, values: dict, e: Entry, rows: torch.Tensor) -> Back | None:
    """``e`` (on ``node``'s output) passed to its inputs, kept an Entry where the op acts per element, weights where
    a ``start`` rule writes them; None where neither applies (the caller makes ``e`` dense)."""
    key = engine.keys[node]
    if key not in ("relu", "batch_norm", "add", "sub") and (BACKWARD_RULES.find(key) is None
                                                             or BACKWARD_RULES.find(key).start is None):
        return None
    call = engine._call(node, values)
    back = Back(call, None, rows, output=values[node.name], memo=engine.memo)
    try:
        if key == "relu":
            x = call.args[0] if call.args else None
            if not _same_shape(x, e.shape):
                return None
            low, up, icpt = back.remember("relu", x, lambda: relu_relaxation(x))
            slope = torch.where(e.coef >= 0, e.at(low, rows), e.at(up, rows))
            back.emit(x, e.scaled(slope))
            back.add_bias(e.coef.clamp(max=0) * e.at(icpt, rows))
        elif key == "batch_norm":
            x, scale, shift = batch_norm_affine(call)
            if not _same_shape(x, e.shape) or len(e.shape) < 1:
                return None
            channel = e.neuron // max(1, int(torch.Size(e.shape[1:]).numel()))
            back.emit(x, e.scaled(scale.index_select(0, channel)))
            back.add_bias(e.coef * shift.index_select(0, channel))
        elif key in ("add", "sub"):
            p = call.bind(_BINARY)
            alpha = p["alpha"]
            if not isinstance(alpha, numbers.Real):
                return None
            terms = ((p["input"], 1.0), (p["other"], alpha if key == "add" else -alpha))
            if any(not (_same_shape(v, e.shape) or isinstance(v, numbers.Real)) for v, _ in terms):
                return None
            for v, factor in terms:
                if isinstance(v, Interval):
                    back.emit(v, e.scaled(factor))
                else:
                    back.add_bias(e.coef * (factor * v))
        else:
            start = BACKWARD_RULES.find(key).start(call, e.neuron, e.coef, rows)
            if start is None:
                return None
            start.output, start.memo = back.output, back.memo
            back = start
    except HardenError:   # a variant the entry step does not take: the dense rule decides
        return None
    engine.rules_used.add(key)
    return back
