"""``--eps auto`` for ctt-loose/strict: the paper's grid search for the certified box's radius.

Paper 000, section 4 / appendix B: "a grid search spanning values from 1e-5 to
1e-1, and determine its value based on the optimal performance in accuracy and
detection ratio under a simple FGSM attack".  Here, on the calibration split
only (never the test split), split into halves A and B:

1. The attack eps: :func:`harden.attacks.strength.half_accuracy_eps` of the
   ORIGINAL model on B (FGSM that halves its accuracy), computed once.
2. For each eps of the grid (fractions of the input range's width): fine-tune
   a copy of the original model at that eps with a quarter of the real step
   budget (the same loop, convergence rule and kept-check rule as the real
   run), calibrate its CTT alarm on A's clean inputs to the target FPR (the
   final calibration's own ``calibrate`` on the method's raw score), run FGSM
   at the attack eps against the fine-tuned copy on B and score the detection
   rate among the successful adversarial examples of the inputs it classifies
   correctly.
3. Choose (:func:`choose`): among candidates whose calibration accuracy is
   within ``max_accuracy_drop`` of the original model's, the highest detection
   rate; ties take the larger eps (a larger certified box).  If none is that
   accurate, the most accurate.

The caller then fine-tunes the real model at the chosen eps with the full budget.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from harden.errors import HardenError
from harden.methods.base import FittedMethod
from harden.train.finetune import FinetuneConfig, finetune_ctt

# Fractions of the input range's width: the paper's 1e-5..1e-1 span, thinned to the part where a box certifies
# anything on small images (1e-5 of [0, 1] is below one 8-bit grey level's 4e-3 a thousand times over).
EPS_FRACTIONS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEARCH_SHARE = 4   # each candidate trains 1/SEARCH_SHARE of the real run's step budget


EPS_RULES = ("auto", "scaled")
# --eps scaled: the certified box is this fraction of the FGSM eps that halves the model's accuracy.  The paper's
# own picks sit there: LeNet-5 on MNIST halves at FGSM 0.15 and the paper trains at 3e-3 (0.02 x 0.15); its CIFAR
# networks train at 1e-4, a fiftieth of the ~0.005 that halves a CIFAR classifier.
SCALED_FRACTION = 0.02


def parse_eps(value: float | str) -> float | str:
    """--eps: a number (input units), "auto" (the grid search) or "scaled" (:func:`scaled_eps`)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in EPS_RULES:
            return text
        try:
            value = float(text)
        except ValueError:
            raise HardenError(f"--eps must be a number, auto or scaled; got {value!r}") from None
    return float(value)


def scaled_eps(model, x: torch.Tensor, y: torch.Tensor, input_range, num_classes: int):
    """SCALED_FRACTION x the FGSM eps that halves ``model``'s accuracy on (x, y) (the calibration split)."""
    from harden.attacks.strength import half_accuracy_eps

    strength = half_accuracy_eps(model, x[:500].numpy(), y[:500].numpy(), input_range=input_range,
                                 num_classes=num_classes)
    return SCALED_FRACTION * strength.eps, strength


@dataclass
class Candidate:
    eps: float           # input units
    accuracy: float      # calibration accuracy of the candidate's kept check (whole calibration split)
    detection: float     # FGSM on half B: alarmed share of the successful adversarial examples of correct inputs
    adversarial: int     # how many successful adversarial examples that share is of
    alarm_fpr: float     # the calibrated alarm's rate on half A's clean inputs
    steps: int           # optimisation steps the candidate trained
    stop: str            # why its training stopped
    seconds: float


@dataclass
class EpsSearch:
    eps: float                   # the chosen eps, input units
    attack_eps: float            # FGSM eps (input units) that halves the original model's accuracy on half B
    baseline_accuracy: float     # the original model's calibration accuracy
    candidates: list[Candidate]

    def to_json(self) -> dict:
        return {"requested": "auto", "eps": self.eps, "attack": f"fgsm:eps={self.attack_eps:g}",
                "attack_eps": self.attack_eps, "baseline_accuracy": self.baseline_accuracy,
                "candidates": [{k: (round(v, 6) if isinstance(v, float) and k != "eps" else v)
                                for k, v in dataclasses.asdict(c).items()} for c in self.candidates]}


def choose(candidates: list[Candidate], baseline_accuracy: float, max_accuracy_drop: float) -> Candidate:
    """The highest detection among candidates within ``max_accuracy_drop`` of the original calibration accuracy
    (ties: the larger eps); none that accurate: the most accurate (ties: detection, then the larger eps)."""
    accurate = [c for c in candidates if c.accuracy >= baseline_accuracy - max_accuracy_drop - 1e-12]
    if accurate:
        return max(accurate, key=lambda c: (c.detection, c.eps))
    return max(candidates, key=lambda c: (c.accuracy, c.detection, c.eps))


def _calibrate_threshold(raw: np.ndarray, fpr: float) -> float:
    """The final calibration's threshold for one method's raw scores (point estimate: fpr_confidence=0 where the
    calibration takes a confidence level)."""
    from harden.detectors.calibration import calibrate

    extra = {"fpr_confidence": 0.0} if "fpr_confidence" in inspect.signature(calibrate).parameters else {}
    return float(calibrate(raw=raw.reshape(-1, 1), k=1, fpr=fpr, **extra).thresholds[0])


def fgsm_detection(fitted: FittedMethod, gm: fx.GraphModule, half_a: tuple[torch.Tensor, torch.Tensor],
                   half_b: tuple[torch.Tensor, torch.Tensor], attack_eps: float, fpr: float,
                   input_range: tuple[float, float], num_classes: int, seed: int = 0) -> tuple[float, int, float]:
    """(detection rate, successful adversarial examples, alarm rate on A) of ``fitted`` on ``gm``: the alarm
    calibrated on A's clean inputs, FGSM at ``attack_eps`` on B against ``gm``."""
    from harden.attacks.catalog import AttackSpec, run_attack
    from harden.instrumentation.hardened import LOGITS_OUTPUT, HardenedModel

    hardened = HardenedModel(gm, [fitted])

    def outputs(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = hardened.torch_outputs(x)
        return out[LOGITS_OUTPUT].argmax(1), hardened.raw_scores(out)[:, 0]

    _, raw_a = outputs(half_a[0])
    threshold = _calibrate_threshold(raw_a, fpr)
    x_b, y_b = half_b[0].numpy(), half_b[1].numpy()
    x_adv = run_attack(gm, AttackSpec("fgsm", {"eps": attack_eps}), x_b, y_b, input_range=input_range,
                       num_classes=num_classes, seed=seed)
    clean_pred, _ = outputs(half_b[0])
    adv_pred, raw_adv = outputs(torch.from_numpy(x_adv))
    hits = (clean_pred == y_b) & (adv_pred != y_b)
    detection = float((raw_adv[hits] > threshold).mean()) if hits.any() else 0.0
    return detection, int(hits.sum()), float((raw_a > threshold).mean())


def _candidate(eps: float, gm: fx.GraphModule, sites: list[str], masks: dict[str, torch.Tensor],
               train: tuple[torch.Tensor, torch.Tensor], calibration: tuple[torch.Tensor, torch.Tensor],
               halves, attack_eps: float, input_range: tuple[float, float], num_classes: int,
               cfg: FinetuneConfig, make_method: Callable, progress: Callable[[str, float], None]) -> Candidate:
    """Fine-tune a copy of ``gm`` at ``eps`` with ``cfg``'s (reduced) budget and score it by FGSM detection."""
    started = time.perf_counter()
    model = copy.deepcopy(gm)
    history, best, thresholds, scales = finetune_ctt(model, sites, masks, train, calibration, input_range,
                                                     dataclasses.replace(cfg, eps=eps), progress)
    detection, adversarial, alarm_fpr = fgsm_detection(make_method(thresholds, scales), model, *halves, attack_eps,
                                                       cfg.fpr, input_range, num_classes, cfg.seed)
    if best:
        accuracy = history[best - 1].accuracy
    else:  # no check was accurate enough: the copy holds the original weights
        with torch.no_grad():
            accuracy = float((model(calibration[0]).argmax(1) == calibration[1]).float().mean())
    return Candidate(eps=eps, accuracy=accuracy, detection=detection, adversarial=adversarial,
                     alarm_fpr=alarm_fpr, steps=history[-1].step, stop=history[-1].stop,
                     seconds=time.perf_counter() - started)


def search_eps(
    gm: fx.GraphModule,
    sites: list[str],
    masks: dict[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor],
    input_range: tuple[float, float],
    num_classes: int,
    cfg: FinetuneConfig,
    make_method: Callable[[dict, dict | None], FittedMethod],
    *,
    fractions: tuple[float, ...] = EPS_FRACTIONS,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
) -> EpsSearch:
    """The grid search of the module docstring; ``gm`` is left untouched.  ``cfg`` is the real run's
    configuration (its eps is replaced per candidate, its budget cut to a quarter); ``make_method(thresholds,
    scales)`` builds the method's head the way the real fit does."""
    from harden.attacks.strength import half_accuracy_eps

    x_cal, y_cal = calibration
    if len(x_cal) < 4:
        raise HardenError(f"--eps auto needs at least 4 calibration samples; got {len(x_cal)}")
    half = len(x_cal) // 2
    halves = ((x_cal[:half], y_cal[:half]), (x_cal[half:], y_cal[half:]))
    width = float(input_range[1] - input_range[0])
    with torch.no_grad():
        baseline_accuracy = float((gm(x_cal).argmax(1) == y_cal).float().mean())
    progress("eps auto: FGSM strength on the original model", 0.0)
    attack_eps = half_accuracy_eps(gm, halves[1][0].numpy(), halves[1][1].numpy(), input_range=input_range,
                                   num_classes=num_classes, seed=cfg.seed).eps
    budget = cfg.steps if cfg.epochs is None else cfg.epochs * math.ceil(len(train[0]) / cfg.batch_size)
    reduced = dataclasses.replace(cfg, epochs=None, steps=max(1, budget // SEARCH_SHARE))
    candidates = []
    for i, fraction in enumerate(fractions):
        eps = fraction * width

        def report(message: str, done: float, i: int = i, eps: float = eps) -> None:
            progress(f"eps auto {i + 1}/{len(fractions)} (eps {eps:g}): {message}", (i + done) / len(fractions))

        candidates.append(_candidate(eps, gm, sites, masks, train, calibration, halves, attack_eps, input_range,
                                     num_classes, reduced, make_method, report))
    chosen = choose(candidates, baseline_accuracy, cfg.max_accuracy_drop)
    return EpsSearch(eps=chosen.eps, attack_eps=float(attack_eps), baseline_accuracy=baseline_accuracy,
                     candidates=candidates)
