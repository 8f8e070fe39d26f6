"""Intervals over tensors: element-wise lower and upper bounds, batched over samples (leading dim N).

Every operation here is a pure torch operation (no ``.item()``, nothing in
place), so bounds stay differentiable for the CTT losses and follow the device
of the tensors they are built from.
"""

from __future__ import annotations

from typing import Sequence

import torch



class Interval:
    """The box ``lo <= v <= hi`` (element-wise) of the values a tensor can take.

    Not a tuple on purpose: a graph value that is a tuple of tensors must never
    be mistaken for a pair of bounds.
    """

    __slots__ = ("lo", "hi", "joint")

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, joint: torch.Tensor | None = None):
        if lo.shape != hi.shape:
            lo, hi = torch.broadcast_tensors(lo, hi)
            joint = None
        self.lo = lo
        self.hi = hi
        self.joint = joint
        """Optionally the one buffer both bounds are views of: ``cat([hi, lo], dim=1)``.  Channel-wise
        rules (element-wise ops, pooling) then run once on it instead of twice (see :meth:`map_channelwise`)."""

    @classmethod
    def from_joint(cls, joint: torch.Tensor) -> "Interval":
        """The interval whose upper bound is the first half of ``joint``'s channels and lower bound the second."""
        c = joint.shape[1] // 2
        return cls(joint[:, c:], joint[:, :c], joint)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def point(cls, x: torch.Tensor) -> "Interval":
        """The degenerate interval [x, x]."""
        return cls(x, x)

    @classmethod
    def from_centre(cls, centre: torch.Tensor, radius: torch.Tensor) -> "Interval":
        """[c - r, c + r]."""
        return cls(centre - radius, centre + radius)

    @classmethod
    def from_box(cls, x: torch.Tensor, eps, input_range: "Sequence[float] | None" = None) -> "Interval":
        """The L-inf ball of radius ``eps`` around ``x``, clipped to the input range:
        [max(x - eps, range_lo), min(x + eps, range_hi)].

        ``eps`` is a float or a tensor broadcastable to ``x`` (e.g. one radius per
        sample, shape [N, 1, 1, 1]).
        """
        lo, hi = x - eps, x + eps
        if input_range is not None:
            range_lo, range_hi = input_range
            # lo and hi are fresh: clip them in place unless autograd records them.
            grad = lo.requires_grad or hi.requires_grad
            if range_lo is not None:
                lo = torch.clamp(lo, min=float(range_lo)) if grad else lo.clamp_(min=float(range_lo))
            if range_hi is not None:
                hi = torch.clamp(hi, max=float(range_hi)) if grad else hi.clamp_(max=float(range_hi))
        return cls(lo, hi)

    # -- views ----------------------------------------------------------------------------------
    @property
    def centre(self) -> torch.Tensor:
        return (self.hi + self.lo) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.hi - self.lo) / 2

    @property
    def width(self) -> torch.Tensor:
        return self.hi - self.lo

    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    @property
    def device(self) -> torch.device:
        return self.lo.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lo.dtype

    def dim(self) -> int:
        return self.lo.dim()

    def size(self, *dim):
        return self.lo.size(*dim)

    # -- operations -----------------------------------------------------------------------------
    def map(self, fn) -> "Interval":
        """Apply a monotone non-decreasing (or purely structural) function to both end points."""
        return Interval(fn(self.lo), fn(self.hi))

    def map_channelwise(self, fn) -> "Interval":
        """:meth:`map` for a function that treats every channel (dim 1) alone and keeps the channel count,
        e.g. an element-wise op or a pooling: one call on the joint buffer when there is one."""
        if self.joint is not None:
            return Interval.from_joint(fn(self.joint))
        return Interval(fn(self.lo), fn(self.hi))

    def intersect(self, other: "Interval") -> "Interval":
        """(a, b) n (c, d) = (max(a, c), min(b, d)) (paper 000, eq. 4); may be empty (lo > hi)."""
        return Interval(torch.maximum(self.lo, other.lo), torch.minimum(self.hi, other.hi))

    def clamp_upper(self, t: torch.Tensor | float) -> "Interval":
        """Intersection with (-inf, t]."""
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=self.hi.dtype, device=self.hi.device)
        return Interval(self.lo, torch.minimum(self.hi, t))

    def is_empty(self) -> torch.Tensor:
        """Element-wise: True where the interval holds no value (lo > hi)."""
        return self.lo > self.hi

    def contains(self, x: torch.Tensor, tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Element-wise: lo - tol <= x <= hi + tol."""
        return (x >= self.lo - tol) & (x <= self.hi + tol)

    def to(self, *args, **kwargs) -> "Interval":
        return Interval(self.lo.to(*args, **kwargs), self.hi.to(*args, **kwargs))

    def detach(self) -> "Interval":
        return Interval(self.lo.detach(), self.hi.detach())

    def __repr__(self) -> str:
        return f"Interval(shape={tuple(self.shape)}, lo={self.lo!r}, hi={self.hi!r})"


def is_interval(value) -> bool:
    return isinstance(value, Interval)


def as_interval(value) -> Interval:
    """Intervals pass; a concrete tensor or number becomes the point interval."""
    if isinstance(value, Interval):
        return value
    return Interval.point(torch.as_tensor(value))
