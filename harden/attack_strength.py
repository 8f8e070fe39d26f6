"""How strong an attack must be to hurt a given model: eps chosen per model, never one number for every dataset.

A budget like ``eps=0.1`` means something on MNIST and something else on a
colour dataset or a model trained on 800 inputs.  :func:`half_accuracy_eps`
finds, on data the caller names (a calibration split, never the test split),
the grid eps at which FGSM brings the model's accuracy down to about half of
its clean accuracy.  The suite states its attacks at that eps per pair, and
methods that train on adversarial examples or judge a setting with an attack
(``eps=auto`` options) ask the same question.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Fractions of the input range; geometric, about x1.5 a step.
EPS_GRID = (0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class AttackStrength:
    eps: float                         # in input units
    clean_accuracy: float
    accuracy: dict[float, float]       # FGSM accuracy at each grid eps tried (input units)

    def to_json(self) -> dict:
        return {"eps": self.eps, "clean_accuracy": self.clean_accuracy,
                "fgsm_accuracy": {f"{k:g}": v for k, v in self.accuracy.items()}}


def half_accuracy_eps(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, input_range: tuple[float, float],
                      num_classes: int, grid: tuple[float, ...] = EPS_GRID, seed: int = 0) -> AttackStrength:
    """The grid eps (as a fraction of the input range, returned in input units) whose FGSM accuracy on (x, y) is
    closest to half the clean accuracy; the search stops at the first eps below half.  Ties take the smaller eps."""
    from harden.attacks import AttackSpec, run_attack

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    width = float(input_range[1] - input_range[0])
    with torch.no_grad():
        clean = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    target = clean / 2
    tried: dict[float, float] = {}
    for fraction in grid:
        eps = fraction * width
        x_adv = run_attack(model, AttackSpec("fgsm", {"eps": eps}), x, y, input_range=input_range,
                           num_classes=num_classes, seed=seed)
        with torch.no_grad():
            tried[eps] = float((model(torch.from_numpy(x_adv)).argmax(1).numpy() == y).mean())
        if tried[eps] <= target:
            break
    best = min(tried, key=lambda e: (abs(tried[e] - target), e))
    return AttackStrength(eps=float(best), clean_accuracy=clean, accuracy=tried)
