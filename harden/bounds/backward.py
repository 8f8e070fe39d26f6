"""Backward linear relaxation (CROWN-class): the rule registry and what a rule sees.

A backward rule turns linear coefficients on a node's output into linear
coefficients on its inputs.  The objective is always a *lower* bound of
``sum(A * value) + bias`` for each row of ``A``; a row is one linear function
of one sample (a margin, or +- one neuron), so ``rows[r]`` names the sample of
row ``r`` and every per-sample relaxation parameter is gathered by it.

Affine ops pass coefficients through exactly (the adjoint of the op).  A
nonlinear op replaces itself by a linear lower and a linear upper bound valid
over its input's interval: the positive part of ``A`` meets the lower bound,
the negative part the upper bound (Zhang et al. 2018).  The interval of an
op's input is the one the forward pass recorded (interval, or refined by
backward passes itself, see :mod:`harden.bounds.crown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from harden.bounds.interval import Interval
from harden.bounds.rules import Call
from harden.core.registry import Registry


@dataclass
class Back:
    """One node being passed backwards: coefficients ``A`` [R, *output shape] for the rows ``rows`` [R]."""

    call: Call
    A: torch.Tensor
    rows: torch.Tensor
    output: Interval | None = None   # the node's own bounds (forward pass)
    memo: dict | None = None         # per-sample relaxation parameters, shared by all passes over the same bounds
    contributions: list[tuple[object, torch.Tensor]] = field(default_factory=list)
    bias: torch.Tensor | float = 0.0

    def per_row(self, t: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor [N, ...] gathered for every row: [R, ...]."""
        return t.index_select(0, self.rows)

    def remember(self, what: str, x: Interval, compute: Callable[[], object]):
        """``compute()`` once per (what, bounds object): every chunk and every refinement reads the same bounds."""
        if self.memo is None:
            return compute()
        key = (what, id(x))
        hit = self.memo.get(key)
        if hit is None or hit[0] is not x:
            hit = self.memo[key] = (x, compute())   # keeps x alive, so its id is not reused
        return hit[1]

    def emit(self, value, coefficients: torch.Tensor) -> None:
        """Coefficients on ``value`` (an input Interval of the call, as the rule received it)."""
        self.contributions.append((value, coefficients))

    def add_bias(self, b: torch.Tensor) -> None:
        """A constant [R] that the linear function gains."""
        self.bias = self.bias + b


@dataclass
class BackwardRule:
    backward: Callable[[Back], None]
    start: Callable | None = None
    """Optional ``start(call, neuron [R], sign [R], rows [R]) -> Back`` for the function ``sign * output[neuron]``
    without building a one-hot ``A`` (a linear or convolution layer writes its weight rows directly)."""
    relaxes: Callable[[Interval], torch.Tensor] | None = None
    """For a nonlinear op: a bool mask [N, *input shape] of the input neurons whose interval shapes the
    relaxation (a ReLU: the unstable ones).  Tighter bounds there tighten everything after; elsewhere
    they change nothing, so only these are refined by backward passes."""


BACKWARD_RULES: Registry[BackwardRule] = Registry("backward bound rule")


def backward_rule(key: str, *, start=None, relaxes=None):
    def decorate(fn):
        BACKWARD_RULES.register(key)(BackwardRule(fn, start, relaxes))
        return fn

    return decorate


SEGMENTS = 8
"""Rows of at most this many samples (each sample's rows consecutive) read per-sample tensors by broadcasting."""


def segments(rows: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(sample, start, end) per run of equal samples in ``rows``, or None when there are more than :data:`SEGMENTS`
    runs.  A pass's rows come sample by sample (the neurons picked by ``nonzero``), and a chunk mostly holds one
    sample or a few: reading a sample's parameters by broadcasting skips a copy per row of every map."""
    if rows.numel() == 0:
        return None
    samples, counts = torch.unique_consecutive(rows, return_counts=True)
    if samples.numel() > SEGMENTS:
        return None
    out, start = [], 0
    for sample, count in zip(samples.tolist(), counts.tolist()):
        out.append((sample, start, start + count))
        start += count
    return out


def flat_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first (rows)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def relax_elementwise(back: Back, x, lower_slope: torch.Tensor, lower_icpt: torch.Tensor | None,
                      upper_slope: torch.Tensor, upper_icpt: torch.Tensor | None) -> None:
    """An element-wise f with ``ls x + lb <= f(x) <= us x + ub`` on the input interval (per sample [N, ...]).

    Lower bound of ``A f``: ``A+ (ls x + lb) + A- (us x + ub)``.
    """
    A = back.A
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    back.emit(x, pos * back.per_row(lower_slope) + neg * back.per_row(upper_slope))
    bias = 0.0
    if lower_icpt is not None:
        bias = bias + flat_sum(pos * back.per_row(lower_icpt))
    if upper_icpt is not None:
        bias = bias + flat_sum(neg * back.per_row(upper_icpt))
    if not isinstance(bias, float):
        back.add_bias(bias)
