"""Adversarial examples crafted outside harden (another toolkit, a red team), read for ``harden evaluate``.

One ``.npz`` per set, read with ``allow_pickle=False``:

* ``x``: the adversarial inputs, float, shaped like the model's input ``[N, *input_shape]``, already in the
  model's input range (they are scored as given: nothing is rescaled);
* ``y``: the true labels ``[N]`` (or one-hot ``[N, K]``);
* ``x_clean`` (optional): the clean input each example was made from, same shape as ``x``.  With it the
  row has harden's own measures (detection among originally-correct inputs, of the successful ones, the
  perturbation's size); without it detection is over every given input and "successful" means
  misclassified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harden.errors import HardenError

KEYS = ("x", "y", "x_clean")


@dataclass
class AdversarialSet:
    label: str
    x: np.ndarray                  # float32 [N, *input_shape]
    y: np.ndarray                  # int64 [N]
    x_clean: np.ndarray | None     # float32 [N, *input_shape] or None


def _float_inputs(name: str, key: str, value: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if value.dtype.kind not in "fiu":
        raise HardenError(f"{name}: {key!r} has dtype {value.dtype}; expected numbers")
    if value.ndim < 1 or tuple(value.shape[1:]) != tuple(input_shape):
        raise HardenError(f"{name}: {key!r} has shape {value.shape}; the model takes [N, "
                          f"{', '.join(map(str, input_shape))}]")
    return np.ascontiguousarray(value, dtype=np.float32)


def _labels(name: str, value: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if value.ndim == 2:
        value = value.argmax(axis=1)
    integral = value.dtype.kind in "iu" or (value.dtype.kind == "f" and bool(np.all(value == np.round(value))))
    if value.ndim != 1 or not integral:
        raise HardenError(f"{name}: 'y' must be integer labels [N] or one-hot [N, K]; got {value.dtype} {value.shape}")
    if len(value) != n:
        raise HardenError(f"{name}: {n} inputs but {len(value)} labels")
    labels = value.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise HardenError(f"{name}: labels must lie in [0, {num_classes - 1}]; found {labels.min()}..{labels.max()}")
    return labels


def load_adversarial(path: Path, *, input_shape: tuple[int, ...], num_classes: int,
                     input_range: tuple[float, float]) -> AdversarialSet:
    """Read and check one set; every problem is one HardenError line naming the file."""
    path = Path(path)
    name = f"--adversarial {path}"
    if not path.is_file():
        raise HardenError(f"{name}: no such file")
    from harden.io.safezip import read_npz

    content = read_npz(path, name)   # within the size caps, never unpickled
    unknown = sorted(set(content) - set(KEYS))
    if "x" not in content or "y" not in content or unknown:
        raise HardenError(f"{name}: needs arrays 'x' and 'y' (and optionally 'x_clean'); "
                          f"found {', '.join(sorted(content)) or 'none'}")
    x = _float_inputs(name, "x", content["x"], input_shape)
    if len(x) == 0:
        raise HardenError(f"{name}: 'x' is empty")
    y = _labels(name, content["y"], len(x), num_classes)
    x_clean = None
    if "x_clean" in content:
        x_clean = _float_inputs(name, "x_clean", content["x_clean"], input_shape)
        if x_clean.shape != x.shape:
            raise HardenError(f"{name}: 'x_clean' has shape {x_clean.shape}, 'x' {x.shape}")
    lo, hi = input_range
    finite = x[np.isfinite(x)]
    if finite.size and (finite.min() < lo - 1e-6 or finite.max() > hi + 1e-6):
        # Scored as given: outside the range the model was instrumented for, the detectors' calibration does
        # not apply, and a silent clip would change what the user measured.
        raise HardenError(f"{name}: 'x' spans [{finite.min():.4g}, {finite.max():.4g}], outside the "
                          f"model's input range [{lo:g}, {hi:g}]")
    return AdversarialSet(label=f"given:{path.name}", x=x, y=y, x_clean=x_clean)
