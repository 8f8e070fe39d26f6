"""The suite's attacks from two independent implementations: ART (through harden.attacks.catalog) and foolbox 3.

Both libraries attack the classifier that ships (the fine-tuned one for CTT); detection is then read from the
exported ONNX graph by harden.evaluation.evaluate.  Each attack is named ``<library>.<attack>``; L-inf attacks run at
the pair's own eps (:func:`harden.attacks.strength.half_accuracy_eps`, chosen on the calibration split).

Settings follow each library's usual ones, not each other's, so a default cannot be tuned to one
implementation's step rule: ART BIM takes 10 steps of eps/10 and PGD 10 steps of 2.5 eps/10 from a random
start (the CTT paper's Table 1 setting, harden's defaults); foolbox BIM and PGD take its defaults (10 steps of
0.2 eps; 40 steps of 0.033 eps from a random start).  DeepFool and CW-L2 are unbounded minimum-norm attacks.
"""

from __future__ import annotations

import numpy as np
import torch

from harden.attacks.catalog import AttackSpec, run_attack

LIBRARIES = ("art", "foolbox")
ATTACK_NAMES = ("fgsm", "bim", "pgd", "deepfool", "cw")
HARDEN_ONLY = ("stadv",)
"""Attacks only harden's catalog has (``--attacks ...,stadv``): crafted through the "art" library's path, skipped
for foolbox."""
KNOWN_ATTACKS = ATTACK_NAMES + HARDEN_ONLY
LINF = ("fgsm", "bim", "pgd")


def art_spec(name: str, eps: float) -> AttackSpec:
    if name in LINF:
        return AttackSpec(name, {"eps": float(eps)})
    return AttackSpec(name, {})


def _foolbox_attack(name: str):
    import foolbox as fb

    return {
        "fgsm": lambda: fb.attacks.FGSM(),
        "bim": lambda: fb.attacks.LinfBasicIterativeAttack(),
        "pgd": lambda: fb.attacks.LinfPGD(),
        "deepfool": lambda: fb.attacks.L2DeepFoolAttack(),
        "cw": lambda: fb.attacks.L2CarliniWagnerAttack(binary_search_steps=5, steps=200, stepsize=0.01),
    }[name]()


def foolbox_adversarial(model: torch.nn.Module, name: str, x: np.ndarray, y: np.ndarray, *, eps: float,
                        input_range: tuple[float, float], seed: int = 0, batch_size: int = 128) -> np.ndarray:
    """Foolbox's adversarial versions of ``x`` (float32, in range); an input the attack failed on is returned
    as foolbox leaves it (its last iterate for bounded attacks, the clean input where minimisation failed)."""
    import foolbox as fb

    torch.manual_seed(seed)
    model = model.eval()
    fmodel = fb.PyTorchModel(model, bounds=(float(input_range[0]), float(input_range[1])))
    attack = _foolbox_attack(name)
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32))
        yb = torch.from_numpy(np.asarray(y[start:start + batch_size], dtype=np.int64))
        _, clipped, _ = attack(fmodel, xb, yb, epsilons=float(eps) if name in LINF else None)
        out.append(clipped.detach().numpy())
    x_adv = np.concatenate(out).astype(np.float32)
    if name in LINF:  # exactly inside the ball in float32, as harden.attacks.catalog does for ART
        x_adv = np.clip(x_adv, x - np.float32(eps), x + np.float32(eps))
    return np.clip(x_adv, np.float32(input_range[0]), np.float32(input_range[1]))


def craft(library: str, model: torch.nn.Module, name: str, x: np.ndarray, y: np.ndarray, *, eps: float,
          input_range: tuple[float, float], num_classes: int, seed: int = 0) -> np.ndarray:
    if library == "art":
        return run_attack(model, art_spec(name, eps), x, y, input_range=input_range, num_classes=num_classes,
                          seed=seed)
    if library == "foolbox":
        if name in HARDEN_ONLY:
            raise ValueError(f"foolbox has no {name}")
        return foolbox_adversarial(model, name, x, y, eps=eps, input_range=input_range, seed=seed)
    raise ValueError(f"unknown attack library {library!r}; known: {', '.join(LIBRARIES)}")
