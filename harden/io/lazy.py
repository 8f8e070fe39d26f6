"""Images read on demand: data larger than memory, indexed like a tensor.

A :class:`LazyImages` is a split's ``x`` when the data is too large to hold (``harden.io.data`` decides by
size): memory-mapped ``.npy`` arrays, or a folder of image files decoded per batch.  Indexing it with a slice,
an integer array or an index tensor reads just those samples, maps them into the input range exactly as the
in-memory path does, and returns a float32 tensor; the stages read it batch by batch.  Asking for the whole
split at once (``numpy()``) is allowed only while it fits ``IN_MEMORY_LIMIT``, else it is an error that names
the step, never a silent load.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from harden.errors import HardenError

# Data whose float32 tensor would exceed this many bytes is read on demand (HARDEN_IN_MEMORY_LIMIT overrides).
DEFAULT_IN_MEMORY_LIMIT = 2 * 1024**3


def in_memory_limit() -> int:
    text = os.environ.get("HARDEN_IN_MEMORY_LIMIT")
    if not text:
        return DEFAULT_IN_MEMORY_LIMIT
    try:
        return int(float(text))
    except ValueError:
        raise HardenError(f"HARDEN_IN_MEMORY_LIMIT={text!r} is not a number of bytes") from None


class LazyImages:
    """``read(indices) -> raw N,C,H,W array`` for sorted unique source indices; ``order`` maps this view's rows
    to source indices; ``convert(raw, indices) -> float32 array in the input range``."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], convert: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 order: np.ndarray, sample_shape: tuple[int, int, int], origin: str):
        self._read, self._convert = read, convert
        self.order = np.asarray(order, dtype=np.int64)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.order)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.order), *self.sample_shape))

    def dim(self) -> int:
        return 4

    def view(self, key) -> "LazyImages":
        """A lazy sub-view (nothing is read)."""
        return LazyImages(self._read, self._convert, self.order[key], self.sample_shape, self.origin)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        indices = self.order[key]
        return torch.from_numpy(self._load(np.atleast_1d(indices)))

    def _load(self, indices: np.ndarray) -> np.ndarray:
        if len(indices) == 0:
            return np.zeros((0, *self.sample_shape), dtype=np.float32)
        unique, inverse = np.unique(indices, return_inverse=True)   # sorted reads: sequential on disk
        raw = self._read(unique)
        return np.ascontiguousarray(self._convert(raw, unique)[inverse], dtype=np.float32)

    def numpy(self) -> np.ndarray:
        size = len(self) * int(np.prod(self.sample_shape)) * 4
        if size > in_memory_limit():
            raise HardenError(f"{self.origin}: a step needs these {len(self)} samples ({size / 1024**3:.1f} GiB) at "
                              f"once, more than HARDEN_IN_MEMORY_LIMIT ({in_memory_limit() / 1024**3:.1f} GiB); "
                              "use --limit, or a method that reads its data in batches")
        return self._load(self.order)

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def to(self, device, *args, **kwargs):
        if torch.device(device).type != "cpu":
            raise HardenError(f"{self.origin}: data read on demand stays on the CPU; batches move to {device}")
        return self

    def batches(self, size: int):
        for start in range(0, len(self), size):
            yield self[start:start + size]


def as_tensor(x) -> torch.Tensor:
    """The whole of ``x`` as a tensor (a LazyImages within the in-memory limit, or a tensor / array as it is)."""
    if isinstance(x, LazyImages):
        return torch.from_numpy(x.numpy())
    return torch.as_tensor(x)


def first_rows(x, limit: int | None):
    """The first ``limit`` rows of a split's x: a tensor, or a lazy view of data read on demand (nothing read)."""
    if limit is None:
        return x
    return x.view(slice(None, limit)) if isinstance(x, LazyImages) else x[:limit]
