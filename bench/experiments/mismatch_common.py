"""What the mismatch experiments (mismatch_pool, mismatch_second, mismatch_select) share: attack lists, predictions."""

from __future__ import annotations

import numpy as np
import torch

GRADIENT_ATTACKS = ["fgsm:eps=0.1", "bim:eps=0.1", "pgd:eps=0.1", "deepfool", "cw"]
DEGRADATIONS = ["noise", "blur", "saltpepper"]


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([model(t[i : i + batch_size]) for i in range(0, len(t), batch_size)]).argmax(1).numpy()


def degrade(model, kind, x, y, *, seed, input_range=(0.0, 1.0)):
    """The method's own degradations (harden.methods.mismatch.degrade): one implementation for both."""
    from harden.methods.mismatch import degrade as _degrade

    return _degrade(model, kind, x, y, seed=seed, input_range=input_range)


def make_adversarial(model: torch.nn.Module, label: str, x: np.ndarray, y: np.ndarray, *, seed: int,
                     input_range=(0.0, 1.0), num_classes: int = 10) -> np.ndarray:
    """A gradient attack (harden's ART wrappers) or a quality degradation, against ``model``."""
    if label in DEGRADATIONS:
        return degrade(model, label, x, y, seed=seed, input_range=input_range)[0]
    from harden.attacks.catalog import parse_attack, run_attack

    return run_attack(model, parse_attack(label), x, y, input_range=input_range, num_classes=num_classes, seed=seed)
