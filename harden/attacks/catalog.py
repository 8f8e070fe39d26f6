"""Adversarial attacks from the Adversarial Robustness Toolbox, named on the command line.

An attack is written ``name`` or ``name:param=value,param=value``, e.g.
``pgd:eps=0.1,steps=20``. :func:`parse_attack` turns that text into an
:class:`AttackSpec` (unknown names, unknown parameters and bad values are a
one-line :class:`~harden.errors.HardenError`); :func:`run_attack` runs it
with ART against a :class:`~art.estimators.classification.PyTorchClassifier`
wrapping the plain torch classifier and returns float32 adversarial inputs,
clipped to the input range.

Every budget (``eps``, ``eps_step``, JSMA's ``theta``) is in input units:
with ``--input-range 0,1``, ``eps=0.1`` is a tenth of the pixel range.

Each entry of :data:`ATTACKS` is an :class:`AttackBuilder`: its docstring
(``print(ATTACKS.get("pgd").__doc__)``) says what the attack is, lists every
parameter with its default, and gives the reason for the defaults.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch

from harden.errors import HardenError
from harden.core.options import Param, find_param, format_value, resolve, split_spec
from harden.core.registry import Registry

Value = Union[float, int, str]
Default = Union[Value, Callable[[dict], Value]]

# An oracle a decision-based attack may query instead of ``model``: a torch
# module, or a callable from a float32 NCHW batch to logits (a scorer's dict
# with a "logits" entry is accepted too, so the ONNX graph itself can be queried).
TargetModel = Union[torch.nn.Module, Callable[[np.ndarray], Any]]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class AttackSpec:
    """An attack name and the parameters the user set (defaults are filled in by :meth:`resolved`)."""

    name: str
    params: dict[str, Value]

    def label(self) -> str:
        """Canonical text, ``name:k=v,...`` in the builder's parameter order; ``parse_attack(label)`` gives it back."""
        if not self.params:
            return self.name
        order = [p.name for p in ATTACKS.get(self.name).params] if self.name in ATTACKS else sorted(self.params)
        keys = [k for k in order if k in self.params] + sorted(k for k in self.params if k not in order)
        return self.name + ":" + ",".join(f"{k}={format_value(self.params[k])}" for k in keys)

    def resolved(self) -> dict[str, Value]:
        """Every parameter of the attack, defaults filled in, validated."""
        return ATTACKS.get(self.name).resolve(self.params)

    def __hash__(self) -> int:  # params is a dict; hash the canonical text instead
        return hash(self.label())

    def __str__(self) -> str:
        return self.label()


class AttackBuilder:
    """A registered attack: its parameters and a function that builds the ART attack.

    ``make(estimator, params, batch_size)`` receives every parameter resolved.
    ``black_box`` attacks only query predictions (they may query ``target_model``);
    ``linf_bound`` names the parameter that bounds the L-inf perturbation (or
    says ``None``, for L2 / L0 / unbounded attacks); ``targeted`` attacks receive
    random target classes (never the true one) instead of the true labels (a function of the
    resolved parameters when a parameter decides it).
    """

    def __init__(self, name: str, params: tuple[Param, ...], make: Callable, *, black_box: bool,
                 linf_bound: Callable[[dict], float | None] | None, targeted: bool | Callable[[dict], bool],
                 doc: str):
        self.name = name
        self.params = params
        self.make = make
        self.black_box = black_box
        self.linf_bound = linf_bound
        self.targeted = targeted
        self.summary = doc
        lines = [doc, "", "Parameters (name: type = default):"]
        for p in params:
            lines.append(f"    {p.name}: {p.describe_kind()} = {p.describe_default()}  -- {p.doc}")
        self.__doc__ = "\n".join(lines)

    def is_targeted(self, params: dict) -> bool:
        return bool(self.targeted(params)) if callable(self.targeted) else bool(self.targeted)

    def param(self, name: str) -> Param:
        return find_param(self.params, f"attack {self.name!r}", name)

    def resolve(self, given: dict[str, Any]) -> dict[str, Value]:
        """Defaults filled in (plain ones first, then those computed from other parameters), all checked."""
        return resolve(self.params, f"attack {self.name!r}", given)

    def __repr__(self) -> str:
        return f"AttackBuilder({self.name!r})"


ATTACKS: Registry[AttackBuilder] = Registry("attack")


def _attack(name: str, *params: Param, aliases: tuple[str, ...] = (), black_box: bool = False,
            linf_bound: Callable[[dict], float | None] | None = None,
            targeted: bool | Callable[[dict], bool] = False):
    """Register the decorated ``make(estimator, params, batch_size)`` under ``name`` (and aliases)."""

    def decorate(make: Callable) -> AttackBuilder:
        builder = AttackBuilder(name, params, make, black_box=black_box, linf_bound=linf_bound,
                                targeted=targeted, doc=inspect.getdoc(make) or name)
        for key in (name, *aliases):
            ATTACKS.register(key)(builder)
        return builder

    return decorate


def _linf_eps(p: dict) -> float | None:
    return float(p["eps"]) if p.get("norm", "inf") == "inf" else None


def _norm(text: str) -> float:
    return np.inf if text == "inf" else float(text)


EPS = Param("eps", float, 0.1, "perturbation budget in input units (the CTT paper's MNIST Table 1 uses 0.1 and 0.2)",
            minimum=0.0)
EPS_POSITIVE = Param("eps", float, 0.1, EPS.doc, minimum=0.0, strict=True)
NORM = Param("norm", str, "inf", "the norm eps is measured in", choices=("inf", "1", "2"))


@_attack("fgsm", EPS, NORM, linf_bound=_linf_eps)
def _fgsm(estimator, p, batch_size):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps along the loss gradient's sign.

    With norm=2 or norm=1 this is the fast gradient method (FGM) that steps eps
    along the normalised gradient instead.
    """
    from art.attacks.evasion import FastGradientMethod

    # eps_step is unused by plain FGSM, but ART insists it is positive even when eps=0 (a useful control run)
    return FastGradientMethod(estimator, norm=_norm(p["norm"]), eps=p["eps"], eps_step=p["eps"] or 1.0,
                              batch_size=batch_size)


@_attack(
    "bim",
    EPS_POSITIVE,
    Param("eps_step", float, lambda p: p["eps"] / 10, "size of each step", minimum=0.0, strict=True,
          default_text="eps/10"),
    Param("steps", int, 10, "number of steps", minimum=1),
    linf_bound=_linf_eps,
)
def _bim(estimator, p, batch_size):
    """Basic iterative method (Kurakin et al. 2017): L-inf FGSM steps from the clean input, projected to the eps-ball.

    Defaults are the CTT paper's Table 1 setting: 10 steps of eps/10, no random start.
    """
    from art.attacks.evasion import BasicIterativeMethod

    return BasicIterativeMethod(estimator, eps=p["eps"], eps_step=p["eps_step"], max_iter=p["steps"],
                                batch_size=batch_size, verbose=False)


@_attack(
    "pgd",
    EPS_POSITIVE,
    Param("eps_step", float, lambda p: 2.5 * p["eps"] / p["steps"], "size of each step", minimum=0.0, strict=True,
          default_text="2.5*eps/steps"),
    Param("steps", int, 10, "number of steps", minimum=1),
    Param("restarts", int, 1, "random starts in the eps-ball (ART keeps, per batch, the most successful); "
          "0 starts at the clean input",
          minimum=0),
    NORM,
    linf_bound=_linf_eps,
)
def _pgd(estimator, p, batch_size):
    """Projected gradient descent (Madry et al. 2018): BIM from a uniformly random start in the eps-ball.

    The step defaults to 2.5*eps/steps (eps/4 at 10 steps), Madry et al.'s rule:
    from a random start the iterate must be able to cross the whole ball
    (diameter 2*eps), which 10 steps of eps/10 cannot. The CTT paper's Table 1
    setting (10 steps of eps/10) is ``pgd:eps=0.1,eps_step=0.01`` or, without
    the random start, ``bim:eps=0.1``.
    """
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(estimator, norm=_norm(p["norm"]), eps=p["eps"], eps_step=p["eps_step"],
                                    max_iter=p["steps"], num_random_init=p["restarts"], batch_size=batch_size,
                                    verbose=False)


@_attack(
    "deepfool",
    Param("max_iter", int, 50, "maximum iterations per input", minimum=1),
    Param("epsilon", float, 0.02, "overshoot: the final step is scaled by 1+epsilon", minimum=0.0),
)
def _deepfool(estimator, p, batch_size):
    """DeepFool (Moosavi-Dezfooli et al. 2016): the smallest L2 step to the nearest linearised decision boundary.

    Unbounded: it moves each input until it is misclassified (or max_iter).
    Gradients of all classes are used. The overshoot defaults to the paper's
    0.02 rather than ART's 1e-6: ART applies it once, at the end, so with a
    tiny overshoot results sit on the boundary and may flip back to the true
    class under float32 / onnxruntime rounding. max_iter defaults to 50 (the
    reference implementation's) rather than ART's 100: ART recomputes the full
    Jacobian of the whole batch while any input of it is still unfooled, so
    the few inputs that never cross (clipping at the range's edge) set the cost.
    """
    from art.attacks.evasion import DeepFool

    return DeepFool(estimator, max_iter=p["max_iter"], epsilon=p["epsilon"], nb_grads=estimator.nb_classes,
                    batch_size=batch_size, verbose=False)


@_attack(
    "cw",
    Param("confidence", float, 0.1, "margin kappa the wrong class must win by", minimum=0.0),
    Param("learning_rate", float, 0.01, "initial step of ART's line-searched gradient descent", minimum=0.0,
          strict=True),
    Param("max_iter", int, 100, "iterations per binary-search step", minimum=1),
    Param("binary_search_steps", int, 1, "binary-search steps over the constant c", minimum=1),
    Param("initial_const", float, 1.0, "trade-off constant c between distortion and misclassification "
          "(kept for the whole run when binary_search_steps=1)", minimum=0.0, strict=True),
    aliases=("cw-l2",),
)
def _cw(estimator, p, batch_size):
    """Carlini-Wagner L2 (2017): minimises ||delta||_2^2 + c * max(margin, -confidence) in tanh space.

    Defaults follow the CTT paper (learning rate 0.01, confidence 0.1, one
    binary-search step) except two. max_iter: the paper runs 1000 iterations;
    each of ART's costs two forward+backward passes and ~8 forward passes
    (its line search), so 100 is the most that keeps 200 MNIST images within
    CPU minutes.
    initial_const: with one binary-search step c never changes, and at ART's
    (and cleverhans's) 0.01 the attack leaves a LeNet's MNIST inputs unchanged
    (measured: 0 of 100 moved), which is probably why the paper's Table 1
    C&W rows barely lower the baseline accuracy. c=1 makes it a real, still
    small-distortion attack. ``cw:initial_const=0.01`` is the paper-like
    setting; raise binary_search_steps (e.g. 5) and max_iter for full strength.
    ART's C&W is plain gradient descent with a line search on the step, not
    Adam, so learning_rate is only the initial step.
    """
    from art.attacks.evasion import CarliniL2Method

    return CarliniL2Method(estimator, confidence=p["confidence"], learning_rate=p["learning_rate"],
                           max_iter=p["max_iter"], binary_search_steps=p["binary_search_steps"],
                           initial_const=p["initial_const"], batch_size=batch_size, verbose=False)


@_attack(
    "jsma",
    Param("theta", float, 1.0, "change applied to each chosen feature (input units; positive raises it)"),
    Param("gamma", float, 0.1, "largest fraction of features that may be changed", minimum=0.0, strict=True,
          maximum=1.0),
    targeted=True,
)
def _jsma(estimator, p, batch_size):
    """Jacobian saliency map attack (Papernot et al. 2016): an L0 attack towards a target class.

    Targets are drawn at random (seeded) among the classes other than the true
    one. theta=1 and gamma=0.1 are close to Papernot et al.'s MNIST setting
    (theta=+1, features pushed to the top of the range; gamma=14.5%). ART's
    gamma default of 1.0 lets it change every pixel and is much slower.
    """
    from art.attacks.evasion import SaliencyMapMethod

    return SaliencyMapMethod(estimator, theta=p["theta"], gamma=p["gamma"], batch_size=batch_size, verbose=False)


@_attack(
    "hopskipjump",
    Param("max_iter", int, 10, "gradient-estimation iterations per input", minimum=0),
    Param("max_eval", int, 1000, "cap on queries per gradient estimate", minimum=1),
    Param("init_eval", int, 100, "queries of the first gradient estimate", minimum=1),
    Param("init_size", int, 100, "random draws tried to find a first adversarial point", minimum=1),
    Param("norm", str, "2", "the norm the attack minimises", choices=("2", "inf")),
    black_box=True,
)
def _hopskipjump(estimator, p, batch_size):
    """HopSkipJump (Chen et al. 2020): a decision-based attack that only sees the predicted label.

    It starts from a random misclassified point and walks towards the input
    along estimated gradients of the decision boundary. ART's defaults
    (max_iter 50, max_eval 10000) cost minutes per image on a CPU. 10
    iterations cost about 2,400 model queries in ~150 calls per input (ART
    attacks one input at a time); the result is a weak attack (on a LeNet,
    mean l2 about 2.7 against DeepFool's 1.6), raise max_iter for a stronger one.
    """
    from art.attacks.evasion import HopSkipJump

    return HopSkipJump(estimator, batch_size=batch_size, targeted=False, norm=_norm(p["norm"]),
                       max_iter=p["max_iter"], max_eval=p["max_eval"], init_eval=p["init_eval"],
                       init_size=p["init_size"], verbose=False)


@_attack(
    "boundary",
    Param("max_iter", int, 200, "iterations per input", minimum=0),
    Param("num_trial", int, 25, "proposals tried per step (the CTT paper's 25)", minimum=1),
    Param("sample_size", int, 20, "samples drawn per proposal", minimum=1),
    Param("delta", float, 0.01, "initial orthogonal step", minimum=0.0, strict=True),
    Param("epsilon", float, 0.01, "initial step towards the input", minimum=0.0, strict=True),
    Param("init_size", int, 100, "random draws tried to find a first adversarial point", minimum=1),
    black_box=True,
)
def _boundary(estimator, p, batch_size):
    """Boundary attack (Brendel et al. 2018): a decision-based random walk along the decision boundary.

    Untargeted. ART's default of 5000 iterations is far too slow on a CPU:
    200 iterations with the CTT paper's 25 trials cost about 5,800 model
    queries in ~475 calls per input (ART attacks one input at a time).
    Perturbations stay much larger than a gradient attack's at this budget
    (on a LeNet, mean l2 about 3.5); raise max_iter for a stronger attack.
    """
    from art.attacks.evasion import BoundaryAttack

    return BoundaryAttack(estimator, batch_size=batch_size, targeted=False, delta=p["delta"], epsilon=p["epsilon"],
                          max_iter=p["max_iter"], num_trial=p["num_trial"], sample_size=p["sample_size"],
                          init_size=p["init_size"], verbose=False)


@_attack(
    "stadv",
    Param("tau", float, 0.1, "first weight of the flow loss (Eq. 7; the thesis's 0.1), then searched in [0, 1000]",
          minimum=0.0, maximum=1000.0),
    Param("budget", float, 7.0, "total-variation budget of the flow (Eq. 14; the thesis's 7.0); 0 = none",
          minimum=0.0),
    Param("delta", float, 0.0, "largest flow component per pixel, in pixels; 0 = none (the thesis's attack)",
          minimum=0.0),
    Param("targeted", bool, False, "aim at a random other class instead of any wrong one"),
    Param("kappa", float, 0.0, "margin the goal must be reached by (Eq. 5's k, as -kappa)", minimum=0.0),
    Param("steps", int, 100, "Adam steps per tau", minimum=1),
    Param("search_steps", int, 5, "taus tried per input (binary search, section 4.2)", minimum=1),
    Param("lr", float, 0.01, "Adam's step size, in pixels", minimum=0.0, strict=True),
    targeted=lambda p: p["targeted"],
)
def _stadv(estimator, p, batch_size):
    """Spatially transformed adversarial examples (Xiao et al. 2018; thesis 001, 2.3 and 4.2): a flow per pixel.

    Each pixel samples the input at its position plus its flow, bilinearly
    (Eq. 4; border-clamped). Adam minimises the C&W margin (Eq. 5) + tau x the
    flow's total variation (Eq. 6), or its excess over the budget (Eq. 14);
    tau is binary-searched per input in [0, 1000] (success raises it, failure
    lowers it). Every iterate is projected into the budget (components clipped
    to delta, the field scaled to TV <= budget) before it is judged, so what is
    returned always lies inside it; among successes the smallest TV is kept.
    Not an ART attack: harden's own, on torch's grid_sample.
    """
    from harden.attacks.stadv import StAdvAttack, StAdvSettings

    settings = StAdvSettings(tau=p["tau"], budget=p["budget"], delta=p["delta"], targeted=p["targeted"],
                             kappa=p["kappa"], steps=p["steps"], search_steps=p["search_steps"], lr=p["lr"])
    return StAdvAttack(estimator.model, settings, batch_size, estimator._device)


class _DegradationAttack:
    """ART-like ``generate`` over :func:`harden.attacks.degradations.degrade`, querying only the estimator's predictions."""

    def __init__(self, estimator, kind: str, batch_size: int):
        self.estimator, self.kind, self.batch_size = estimator, kind, batch_size

    def generate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from harden.attacks.degradations import degrade

        lo, hi = (float(v) for v in self.estimator.clip_values)
        labels = np.asarray(y).argmax(axis=1)
        predict = lambda batch: self.estimator.predict(batch, batch_size=self.batch_size).argmax(axis=1)  # noqa: E731
        seed = int(np.random.randint(2**31))  # run_attack seeds numpy: the noise pattern is reproducible
        return degrade(predict, self.kind, x, labels, seed=seed, input_range=(lo, hi))[0]


def _register_degradation(kind: str, what: str) -> None:
    def make(estimator, p, batch_size):
        return _DegradationAttack(estimator, kind, batch_size)

    make.__doc__ = (f"{what} (bi-model mismatch paper, section III-A): per input, the weakest level of a line "
                    f"search that flips the model's decision; an input no level flips keeps the strongest. "
                    f"Queries predictions only (against the ONNX graph when evaluated through it).")
    _attack(kind, black_box=True)(make)


for _kind, _what in (("noise", "Gaussian noise, sigma 0.05 to 1.0 of the input range"),
                     ("blur", "Gaussian blur, sigma 0.5 to 5 pixels"),
                     ("saltpepper", "salt and pepper, 2% to 60% of the pixels set to the ends of the input range")):
    _register_degradation(_kind, _what)


# --------------------------------------------------------------------------- parsing


def parse_attack(text: str) -> AttackSpec:
    """``name`` or ``name:param=value,...`` -> :class:`AttackSpec`; aliases map to their canonical name."""
    name, given = split_spec(text, "attack")
    builder = ATTACKS.get(name)
    params = {key: builder.param(key).convert(f"attack {builder.name!r}", raw) for key, raw in given.items()}
    spec = AttackSpec(builder.name, params)
    builder.resolve(params)  # computed defaults checked too (e.g. a step derived from eps)
    return spec


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """numpy, torch and random seeded for the attack; the caller's generator states are restored after."""
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def _frozen_eval(models: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients (ART needs only input gradients); both restored after."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models]
    for m, _, params in saved:
        m.eval()
        for p, _ in params:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, params in saved:
            m.train(training)
            for p, flag in params:
                p.requires_grad_(flag)


def _device_type(model: torch.nn.Module) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return "gpu" if tensor.device.type == "cuda" else "cpu"
    return "cpu"


_FAST_CLASSIFIER = None


def _fast_classifier_class():
    """ART's PyTorchClassifier with a faster per-sample ``class_gradient`` (same values, one backward pass).

    When each sample asks for the gradient of its own class (C&W twice per
    iteration, JSMA at every step), ART 1.20 runs one backward pass per
    distinct label, up to K; on a CPU that is most of those attacks' time.
    One backward of the sum of the gathered logits gives the same gradients,
    resting on what ART's loop already assumes: in eval mode a sample's logits
    do not depend on the other samples of the batch. (The full Jacobian that
    DeepFool asks for stays ART's: a vmapped backward measured no faster.)
    Decision-based attacks walk in float64; ``predict`` casts to float32.
    """
    global _FAST_CLASSIFIER
    if _FAST_CLASSIFIER is not None:
        return _FAST_CLASSIFIER
    from art.estimators.classification import PyTorchClassifier

    class FastClassGradientClassifier(PyTorchClassifier):
        def predict(self, x, batch_size=128, training_mode=False, **kwargs):
            return super().predict(np.asarray(x, dtype=np.float32), batch_size=batch_size,
                                   training_mode=training_mode, **kwargs)

        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            if (
                label is None
                or isinstance(label, (int, np.integer))
                or training_mode
                or self.is_rnn
                or self._layer_idx_gradients >= 0
                or not self.all_framework_preprocessing
            ):
                return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
            label = np.asarray(label)
            if label.shape != (x.shape[0],) or (label < 0).any() or (label >= self.nb_classes).any():
                raise ValueError(f"Label {label} is out of range.")
            self._model.train(mode=False)
            x_grad = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self._device).requires_grad_(True)
            x_input, _ = self._apply_preprocessing(x_grad, y=None, fit=False, no_grad=False)
            logits = self._model(x_input)[-1]
            index = torch.from_numpy(label.astype(np.int64)).to(self._device)[:, None]
            (grad,) = torch.autograd.grad(logits.gather(1, index).sum(), x_grad)
            return grad.detach().cpu().numpy()[:, None]

    _FAST_CLASSIFIER = FastClassGradientClassifier
    return _FAST_CLASSIFIER


def _torch_estimator(model: torch.nn.Module, input_shape, num_classes: int, clip: tuple[float, float]):
    return _fast_classifier_class()(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                                    nb_classes=num_classes, clip_values=clip, device_type=_device_type(model))


def _oracle_estimator(target: Callable, input_shape, num_classes: int, clip: tuple[float, float]):
    from art.estimators.classification import BlackBoxClassifier

    def predict(batch: np.ndarray) -> np.ndarray:
        out = target(np.ascontiguousarray(batch, dtype=np.float32))
        if isinstance(out, dict):
            out = out["logits"]
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(batch), num_classes):
            raise HardenError(f"target_model returned shape {out.shape}; expected ({len(batch)}, {num_classes})")
        return out

    return BlackBoxClassifier(predict, tuple(input_shape), num_classes, clip_values=clip)


def _check_inputs(x: np.ndarray, y: np.ndarray, lo: float, hi: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    if x.ndim < 2:
        raise HardenError(f"attack inputs must be a batch [N, ...]; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise HardenError(f"attack inputs must be floating point in the input range; got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise HardenError("attack inputs contain NaN or infinity")
    if not lo < hi:
        raise HardenError(f"input range {lo},{hi} is empty")
    tol = 1e-5 * max(1.0, hi - lo)
    if len(x) and (x.min() < lo - tol or x.max() > hi + tol):
        raise HardenError(f"attack inputs span [{x.min():.4g}, {x.max():.4g}], outside the input range [{lo:g}, {hi:g}]; "
                          f"check --input-range")
    y = np.asarray(y)
    if y.ndim == 2:  # one-hot
        y = y.argmax(axis=1)
    if y.shape != (len(x),):
        raise HardenError(f"{len(x)} inputs but labels of shape {y.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0)):
        raise HardenError("labels must be class indices")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise HardenError(f"labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}")
    return np.clip(x, lo, hi), y


def run_attack(model: torch.nn.Module, spec: AttackSpec, x: np.ndarray, y: np.ndarray, *,
               input_range: tuple[float, float], num_classes: int, seed: int = 0, batch_size: int = 128,
               target_model: TargetModel | None = None) -> np.ndarray:
    """Adversarial versions of ``x`` (float32, same shape, inside ``input_range``).

    ``model`` is the plain torch classifier (logits out); it is wrapped in an
    ART ``PyTorchClassifier`` (CrossEntropyLoss, ``clip_values=input_range``,
    input shape from ``x``) in eval mode, with parameter gradients off; its
    mode and flags are restored afterwards. ``y`` holds the true labels
    (indices or one-hot): untargeted attacks move away from them, JSMA aims at
    a random other class. numpy, torch and ``random`` are seeded with ``seed``
    for the call and restored after, so the same call gives the same result.

    ``target_model`` is the model whose decisions are to be flipped when it is
    not ``model``: decision-based attacks (hopskipjump, boundary) query it
    (a torch module, or a callable returning logits or a scorer dict, e.g. the
    onnxruntime graph); gradient attacks are still crafted on ``model``'s
    gradients, i.e. they are transfer attacks from ``model`` to it.

    L-inf-bounded attacks are projected onto the eps-ball once more after ART,
    so ``|x_adv - x| <= eps`` holds exactly in float32.
    """
    builder = ATTACKS.get(spec.name)
    params = builder.resolve(spec.params)
    lo, hi = float(input_range[0]), float(input_range[1])
    x, y = _check_inputs(x, y, lo, hi, num_classes)
    if batch_size < 1:
        raise HardenError(f"batch size must be positive; got {batch_size}")
    if len(x) == 0:
        return x.copy()

    models = [model] + ([target_model] if isinstance(target_model, torch.nn.Module) else [])
    with _seeded(seed), _frozen_eval(models):
        estimator = _torch_estimator(model, x.shape[1:], num_classes, (lo, hi))
        if builder.black_box and target_model is not None:
            if isinstance(target_model, torch.nn.Module):
                estimator = _torch_estimator(target_model, x.shape[1:], num_classes, (lo, hi))
            else:
                estimator = _oracle_estimator(target_model, x.shape[1:], num_classes, (lo, hi))
        try:
            attack = builder.make(estimator, params, batch_size)
        except ValueError as exc:  # ART's own parameter checks
            raise HardenError(f"attack {spec.label()}: {exc}") from None
        labels = y
        if builder.is_targeted(params):
            rng = np.random.default_rng(seed)
            labels = (y + rng.integers(1, num_classes, size=len(y))) % num_classes
        onehot = np.eye(num_classes, dtype=np.float32)[labels]
        x_adv = attack.generate(x=x.copy(), y=onehot)

    x_adv = np.asarray(x_adv, dtype=np.float32).reshape(x.shape)
    x_adv = np.where(np.isfinite(x_adv), x_adv, x)  # an attack that diverged leaves the input as it was
    bound = builder.linf_bound(params) if builder.linf_bound else None
    if bound is not None:
        x_adv = np.clip(x_adv, x - np.float32(bound), x + np.float32(bound))
    return np.clip(x_adv, np.float32(lo), np.float32(hi)).astype(np.float32, copy=False)
