"""A procedurally generated 3-channel dataset: ten shape classes on 32x32 colour images (no download).

Each image has a background of a random colour with a random linear gradient, one shape of a random size,
position, rotation and colour, and per-pixel noise.  The class is the shape.  Small shapes make some classes
hard to tell apart (a small ring looks like a disk), so models do not reach 100%: a useful middle accuracy.
Deterministic for a seed: numpy's PCG64 and vectorised geometry, no image library.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disk", "ring", "square", "frame", "triangle", "cross", "bar", "diamond", "two-dots", "half-disk")
SIZE = 32


def _masks(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Per class, the shape's indicator in its own rotated coordinates (u, v in units of its radius)."""
    r = np.sqrt(u * u + v * v)
    box = np.maximum(np.abs(u), np.abs(v))
    return [
        r <= 1.0,
        (r >= 0.55) & (r <= 1.0),
        box <= 0.8,
        (box >= 0.5) & (box <= 0.85),
        (v >= -0.5) & (v <= 1.0 - 1.5 * np.abs(u)),
        ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0)),
        (np.abs(u) < 1.0) & (np.abs(v) < 0.3),
        np.abs(u) + np.abs(v) <= 1.0,
        ((u - 0.5) ** 2 + v * v <= 0.16) | ((u + 0.5) ** 2 + v * v <= 0.16),
        (r <= 1.0) & (v >= 0.0),
    ]


def make_shapes(n: int, seed: int = 0, noise: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, N x 3 x 32 x 32) and labels (int64), classes balanced up to rounding."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    grid = np.arange(SIZE, dtype=np.float64) + 0.5
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    radius = rng.uniform(4.5, 11.0, size=n)
    cx = rng.uniform(radius, SIZE - radius)
    cy = rng.uniform(radius, SIZE - radius)
    theta = rng.uniform(0, 2 * np.pi, size=n)
    dx = (gx[None] - cx[:, None, None]) / radius[:, None, None]
    dy = (gy[None] - cy[:, None, None]) / radius[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    masks = _masks(u, v)
    shape = np.zeros((n, SIZE, SIZE), dtype=bool)
    for k, mask in enumerate(masks):
        shape |= mask & (y == k)[:, None, None]

    background = rng.uniform(0.1, 0.6, size=(n, 3))
    slope = rng.normal(0, 0.15, size=(n, 2))
    ramp = (slope[:, 0, None, None] * (gx[None] / SIZE - 0.5) + slope[:, 1, None, None] * (gy[None] / SIZE - 0.5))
    sign = rng.choice([-1.0, 1.0], size=(n, 1))
    foreground = np.clip(background + sign * rng.uniform(0.2, 0.45, size=(n, 3)), 0.0, 1.0)
    image = background[:, :, None, None] + ramp[:, None]
    image = np.where(shape[:, None], foreground[:, :, None, None], image)
    image = image + rng.normal(0, noise, size=image.shape)
    x = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return x, y
