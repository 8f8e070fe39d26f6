"""How strong an attack must be to hurt a given model: eps chosen per model, never one number for every dataset.

A budget like ``eps=0.1`` means something on MNIST and something else on a
colour dataset or a model trained on 800 inputs.  :func:`half_accuracy_eps`
finds, on data the caller names (a calibration split, never the test split),
the grid eps at which FGSM brings the model's accuracy down to about half of
its clean accuracy.  The suite states its attacks at that eps per pair, and
methods that train on adversarial examples or judge a setting with an attack
(``eps=auto`` options) ask the same question.

:func:`resolve_auto_eps` is that question for attack texts: SafetyNet and the
bi-model mismatch detector train on ``pgd:eps=auto`` (and, for mismatch,
``fgsm:eps=auto``) by default, and each ``eps=auto`` is replaced by the number
:func:`half_accuracy_eps` finds on a seeded subset (at most
:data:`AUTO_MAX_INPUTS`) of the inputs the caller gives: the training split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Fractions of the input range; geometric, about x1.5 a step.
EPS_GRID = (0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
AUTO = "auto"            # attack text ``name:eps=auto,...``: eps = half_accuracy_eps of the model
AUTO_MAX_INPUTS = 500    # inputs resolve_auto_eps measures on (a seeded subset of those given)


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
    from harden.attacks.catalog import AttackSpec, run_attack

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


def _auto_items(text: str) -> tuple[str, list[str], list[int]] | None:
    """(name, its ``param=value`` items, indices of the ``eps=auto`` ones) of an attack text; None without a ':'."""
    name, sep, rest = text.partition(":")
    if not sep:
        return None
    items = rest.split(",")
    auto = [i for i, item in enumerate(items)
            if item.partition("=")[0].strip().lower() == "eps" and item.partition("=")[2].strip().lower() == AUTO]
    return name, items, auto


def is_auto(text: str) -> bool:
    """Whether the attack text has ``eps=auto``."""
    found = _auto_items(str(text))
    return bool(found and found[2])


def resolve_auto_eps(texts, model: torch.nn.Module, x, y, *, input_range: tuple[float, float], num_classes: int,
                     seed: int = 0, max_inputs: int = AUTO_MAX_INPUTS,
                     grid: tuple[float, ...] = EPS_GRID) -> tuple[list[str], AttackStrength | None]:
    """``texts`` with every ``eps=auto`` replaced by the half-accuracy eps of ``model`` (input units), and the
    :class:`AttackStrength` it came from (None when no text says ``eps=auto``; then nothing is computed).

    The eps is computed once, on at most ``max_inputs`` of ``(x, y)`` drawn with ``seed`` (all of them when there
    are fewer); the caller chooses the inputs, which must be training data, never the test split.  Texts without
    ``eps=auto`` (numeric eps, degradations such as ``saltpepper``) are returned exactly as given.
    """
    texts = [str(t) for t in texts]
    if not any(is_auto(t) for t in texts):
        return texts, None
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"eps=auto needs labelled inputs; got {len(x)} inputs and {len(y)} labels")
    if len(x) > max_inputs:
        rows = np.sort(np.random.default_rng(seed % 2**63).permutation(len(x))[:max_inputs])
        x, y = x[rows], y[rows]
    strength = half_accuracy_eps(model, x, y, input_range=input_range, num_classes=num_classes, grid=grid,
                                 seed=seed % 2**31)
    number = f"{strength.eps:.6g}"
    resolved = []
    for text in texts:
        found = _auto_items(text)
        if not found or not found[2]:
            resolved.append(text)
            continue
        name, items, auto = found
        items = [f"{item.partition('=')[0].strip()}={number}" if i in auto else item for i, item in enumerate(items)]
        resolved.append(name + ":" + ",".join(items))
    return resolved, strength


def auto_eps_facts(strength: AttackStrength | None, given: int, max_inputs: int = AUTO_MAX_INPUTS) -> dict | None:
    """For a method's config: what :func:`resolve_auto_eps` measured on ``given`` training inputs (None when no
    attack said ``eps=auto``): :meth:`AttackStrength.to_json` plus the split and how many inputs were used."""
    if strength is None:
        return None
    return {"split": "train", "inputs": int(min(given, max_inputs)), "attack": "fgsm", **strength.to_json()}


def check_training_attacks(texts, owner: str, extra_names: tuple[str, ...] = ()) -> None:
    """Every attack text a method will train on parses (``eps=auto`` standing in for a number), or one error
    line; ``extra_names`` are bare names the method accepts besides attacks (e.g. quality degradations)."""
    from harden.attacks.catalog import parse_attack
    from harden.errors import HardenError

    for text in texts:
        if text.strip().lower() in extra_names:
            continue
        found = _auto_items(text)
        probe = text if not (found and found[2]) else found[0] + ":" + ",".join(
            "eps=0.1" if i in found[2] else item for i, item in enumerate(found[1]))
        try:
            parse_attack(probe)
        except HardenError as exc:
            raise HardenError(f"{owner}: attacks: {exc}") from None
