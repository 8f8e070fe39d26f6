"""Quality degradations (Gaussian noise, Gaussian blur, salt and pepper) as model-queried 'attacks'.

The bi-model mismatch paper (003, section III-A) tests detectors on degraded
inputs as well as on adversarial ones: per image, the weakest degradation that
flips the model's decision (a line search over increasing levels).  They only
query the model's predictions, so ``harden evaluate --attack noise`` can run
them against any classifier; the mismatch method can also train on them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from harden.errors import HardenError

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 batch -> predicted class indices


def _torch_predictor(model: nn.Module, batch_size: int = 512) -> Predictor:
    def predict(x: np.ndarray) -> np.ndarray:
        model.eval()
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            return torch.cat([model(t[i : i + batch_size]) for i in range(0, len(t), batch_size)]).argmax(1).numpy()

    return predict



DEGRADATIONS = ("noise", "blur", "saltpepper")
NOISE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 21))        # Gaussian sigma, fraction of the input range
BLUR_LEVELS = tuple(round(0.5 + 0.25 * i, 2) for i in range(19))      # Gaussian sigma in pixels, 0.5 .. 5
SP_LEVELS = tuple(round(0.02 * i, 2) for i in range(1, 31))           # fraction of pixels set to lo or hi


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of NCHW images (edge padding)."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    out = np.asarray(x, dtype=np.float32)
    for axis in (2, 3):
        n = out.shape[axis]
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def degrade(model: nn.Module | Predictor, kind: str, x: np.ndarray, y: np.ndarray, *, seed: int,
            input_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The paper's quality-degradation attacks: per image, the smallest level (line search) that flips ``model``.

    ``noise``: additive Gaussian noise; ``blur``: Gaussian blur; ``saltpepper``: a fraction of the pixels set to
    the ends of the input range.  ``model`` is a torch classifier or a function from a float32 batch to
    predicted classes.  Each image's noise pattern is drawn once (seeded), so raising the level only
    strengthens it.  Returns ``(x_degraded, flipped)``; an image no level flips gets the largest level.
    """
    predict = _torch_predictor(model) if isinstance(model, nn.Module) else model
    lo, hi = float(input_range[0]), float(input_range[1])
    x = np.asarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        pattern = rng.standard_normal(x.shape).astype(np.float32)
        levels, make = NOISE_LEVELS, lambda s: np.clip(x + np.float32(s * (hi - lo)) * pattern, lo, hi)
    elif kind == "blur":
        levels, make = BLUR_LEVELS, lambda s: np.clip(gaussian_blur(x, s), lo, hi)
    elif kind == "saltpepper":
        rank = rng.random(x.shape)
        salt = rng.random(x.shape) < 0.5

        def make(f):
            out = x.copy()
            hit = rank < f
            out[hit & salt] = hi
            out[hit & ~salt] = lo
            return out

        levels = SP_LEVELS
    else:
        raise HardenError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    out = x.copy()
    done = np.zeros(len(x), dtype=bool)
    candidate = x
    for level in levels:
        candidate = make(float(level)).astype(np.float32)
        pred = predict(candidate)
        flip = ~done & (pred != y)
        out[flip] = candidate[flip]
        done |= flip
        if done.all():
            break
    out[~done] = candidate[~done]
    return out, done
