"""Type II (adaptive) attacks: PGD against the classifier AND a differentiable stand-in of its detectors.

A detector that quantises, thresholds or runs an SVM has no useful gradient,
so an attacker who knows it replaces it by a *surrogate*: a smooth function
close to the detector's raw score (SafetyNet: sigmoid codes and a wider RBF,
the paper's section 3; CTT: hinges on the traps; NIC: the identity through its
floor/ceil staircase, i.e. BPDA; mismatch: the second model and the SVC as they
are).  Surrogates are registered per method name (:func:`register_surrogate`);
a method without one cannot be attacked adaptively, and a bundle none of whose
methods has one is refused.

What the attacker knows (:class:`Knowledge`): ``key-known`` is everything, key
included (the detector as shipped); ``key-unknown`` is Kerckhoffs' attacker,
who has the method, the code, the weights and the training data but not the
key, and models each keyed part from what it can compute (CTT: every neuron of
the trap sites, held below its natural maximum on the training split; NIC:
transforms drawn with a key of its own).  A *proxy* bundle (the same model
hardened with another key) is the other key-unknown attacker: its surrogates,
with their key, stand in for the target's.

The attack is PGD (L-inf sign steps, L2-normalised steps inside the L-inf
ball, or L2 steps in an L2 ball) on ``margin - lam * D``: margin is the
Carlini-Wagner margin (best other logit minus the true one) capped at
``kappa``, so once an input is misclassified the steps go to hiding it, and D
is the policy's combination of the surrogates' smoothed scores, each divided by
its method's calibrated scale: with ``k:N`` only the ``N - k + 1`` methods
whose exact scores are lowest need to be quiet, so D sums those.  After every
step each input is *judged*: key-known, by the caller's judge (harden evaluate
passes the exported ONNX graph in onnxruntime, so a kept input is a real win)
or else the surrogates' exact scores under the policy; key-unknown, by the
attacker's own model of the detector only (it cannot query the key).  The
first perturbation that fools the classifier and raises no judged alarm is
kept.  Every (support, step rule, step size, lam) is a restart on the inputs
not yet won.  ``all`` moves every input value, ``ink`` only those where the
clean input is above the lower end of the input range (a digit's strokes on
MNIST), ``halo1``..``halo3`` the ink and 1-3 pixels around it: constraints an
attacker picks once it knows that detectors reading early layers see any
change of a blank background (against SafetyNet on LeNet-5 / MNIST at L2 2.0,
ink alone reaches 48% of the digits, the 3-pixel halo 75%, every pixel 2%).
``lam = 0`` is the type I
baseline, blind to the detector: its "fooled" rate is the undefended
classifier's at the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from harden.core.distributed import map_chunks
from harden.errors import HardenError
from harden.methods.surrogates import ATTACKERS, KEY_KNOWN, KEY_UNKNOWN, Knowledge, Surrogate, surrogates_for

NORMS = ("linf", "l2")
SUPPORTS = ("all", "ink", "halo1", "halo2", "halo3")
STEP_RULES = ("sign", "l2")   # for L-inf: sign steps, or L2-normalised steps of the same L2 length


@dataclass
class AdaptiveSettings:
    eps: float = 0.1
    norm: str = "linf"
    steps: int = 100
    step_size: float | None = None          # default max(eps / 10, 2.5 eps / steps)
    step_factors: tuple[float, ...] = (1.0, 0.25)   # restarts over step sizes (multiples of step_size)
    step_rules: tuple[str, ...] = STEP_RULES        # L-inf only; L2 always takes L2 steps
    lams: tuple[float, ...] = (1.0, 10.0)   # detector weight; each is a restart on the inputs not yet won
    supports: tuple[str, ...] = SUPPORTS     # which input values may move; each is a restart too
    kappa: float = 2.0                      # cap on the classifier margin
    gate: float = 0.1                       # a method pulls while its exact score is above -gate (score units)
    batch_size: int = 256
    attacker: str = KEY_KNOWN
    surrogate: dict[str, Any] = field(default_factory=dict)   # per-surrogate settings (temperature, widen, ...)

    def step(self) -> float:
        return float(self.step_size) if self.step_size is not None else max(self.eps / 10, 2.5 * self.eps / self.steps)

    def validate(self) -> None:
        if not (np.isfinite(self.eps) and self.eps >= 0) or self.steps < 1:
            raise HardenError(f"adaptive attack: eps must be finite and >= 0 and steps >= 1; got eps={self.eps}, steps={self.steps}")
        if self.norm not in NORMS:
            raise HardenError(f"--adaptive-norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.attacker not in ATTACKERS:
            raise HardenError(f"--adaptive-attacker {self.attacker!r} is not one of {', '.join(ATTACKERS)}")
        unknown = [s for s in self.supports if s not in SUPPORTS]
        if unknown or not self.supports:
            raise HardenError(f"adaptive attack: support {unknown or list(self.supports)} is not one of {', '.join(SUPPORTS)}")
        bad_rules = [r for r in self.step_rules if r not in STEP_RULES]
        if bad_rules or not self.step_rules:
            raise HardenError(f"adaptive attack: step rule {bad_rules or list(self.step_rules)} is not one of {', '.join(STEP_RULES)}")
        if not self.lams or any(not (np.isfinite(v) and v >= 0) for v in self.lams):
            raise HardenError(f"adaptive attack: lams must be finite and >= 0; got {list(self.lams)}")
        if not self.step_factors or any(not (np.isfinite(v) and v > 0) for v in self.step_factors):
            raise HardenError(f"adaptive attack: step factors must be positive; got {list(self.step_factors)}")


class _Target(torch.nn.Module):
    """Logits and every surrogate's raw score from one pass through the classifier."""

    def __init__(self, classifier, surrogates: dict[str, Surrogate]):
        super().__init__()
        from harden.graph.analyse import feature_extractor
        from harden.methods.base import INPUT, LOGITS

        self.surrogates = surrogates
        self.special = (INPUT, LOGITS)
        self.nodes = list(dict.fromkeys(n for s in surrogates.values() for n in s.nodes if n not in self.special))
        self.extractor = feature_extractor(classifier, self.nodes).eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)

    def _acts(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        logits, *values = self.extractor(x)
        acts = dict(zip(self.nodes, values))
        acts[self.special[0]], acts[self.special[1]] = x, logits
        return logits, {name: [acts[n] for n in s.nodes] for name, s in self.surrogates.items()}

    def prepare(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            _, acts = self._acts(x)
        for name, s in self.surrogates.items():
            s.prepare(acts[name])

    def forward(self, x: torch.Tensor, smooth: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, acts = self._acts(x)
        return logits, {name: s.raw(acts[name], smooth) for name, s in self.surrogates.items()}


def _margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa)


Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]   # inputs -> (predicted class, combined alarm)


@dataclass
class _Policy:
    """The bundle's thresholds, scales and k, for the modelled methods."""

    names: list[str]
    thresholds: torch.Tensor
    scales: torch.Tensor
    quiet_needed: int            # how many modelled methods must be quiet: M - k + 1 (at least 1)

    @classmethod
    def of(cls, hardened, surrogates: dict[str, Surrogate]) -> "_Policy":
        """A surrogate's own ``calibration`` (threshold, scale), if it has one, replaces the bundle's: the
        key-unknown attacker's model of a detector has its own alarm rule."""
        names = [m.name for m in hardened.methods]
        modelled = list(surrogates)
        pairs = []
        for n in modelled:
            own = getattr(surrogates[n], "calibration", None)
            j = names.index(n)
            pairs.append(own if own is not None else (float(hardened.policy.thresholds[j]), float(hardened.policy.scales[j])))
        k = int(hardened.policy.k)
        # the unmodelled methods are counted as alarming: the attacker cannot steer them
        quiet_needed = max(1, len(names) - k + 1 - (len(names) - len(modelled)))
        return cls(modelled, torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                   torch.tensor([p[1] for p in pairs], dtype=torch.float64), min(quiet_needed, len(modelled)))

    def scores(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, M] exported-style scores (raw - threshold) / scale; above 0 alarms."""
        return (torch.stack([raw[n].double() for n in self.names], 1) - self.thresholds) / self.scales

    def alarm(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        quiet = ~(self.scores(raw) > 0) & torch.isfinite(self.scores(raw))
        return quiet.sum(1) < self.quiet_needed

    def combined(self, exact_scores: torch.Tensor) -> torch.Tensor:
        """[N] the policy's combined score: the ``quiet_needed``-th smallest method score (above 0 alarms)."""
        scores = torch.nan_to_num(exact_scores, nan=float("inf"))
        return torch.kthvalue(scores, self.quiet_needed, dim=1).values

    def detector_term(self, smooth: dict[str, torch.Tensor], exact_scores: torch.Tensor, gate: float) -> torch.Tensor:
        """Smoothed raw / scale summed over the ``quiet_needed`` methods with the lowest exact scores, each
        counted only while its exact score is above ``-gate``: a method already quiet with room to spare
        pulls no more, and the steps go to the classifier's margin (a hinge on the shipped score)."""
        terms = torch.stack([smooth[n].double() for n in self.names], 1) / self.scales
        terms = terms * (exact_scores > -gate).to(terms.dtype)
        if self.quiet_needed == len(self.names):
            return terms.sum(1)
        chosen = torch.topk(exact_scores, self.quiet_needed, dim=1, largest=False).indices
        return terms.gather(1, chosen).sum(1)


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, lo: float, hi: float) -> torch.Tensor:
    if norm == "linf":
        adv = torch.min(torch.max(adv, x - eps), x + eps)
    else:
        delta = (adv - x).flatten(1)
        length = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        adv = x + (delta * torch.clamp(eps / length, max=1.0)).reshape(x.shape)
    return adv.clamp(lo, hi)


def _movable(x: torch.Tensor, lo: float, support: str) -> torch.Tensor:
    """1 where the attack may change a value: everywhere (``all``), the ink (values above the range's lower
    end), or the ink with an r-pixel halo (``halo<r>``: the ink dilated by a (2r+1)^2 window over every channel,
    i.e. thicker strokes; a detector that sees any change of a blank background sees few of these)."""
    if support == "all":
        return torch.ones_like(x)
    ink = (x > lo).to(x.dtype)
    if support == "ink" or x.dim() != 4:
        return ink
    r = int(support[len("halo"):])
    return torch.nn.functional.max_pool2d(ink.amax(1, keepdim=True), 2 * r + 1, stride=1,
                                          padding=r).expand_as(x).contiguous()


def _direction(grad: torch.Tensor, rule: str) -> torch.Tensor:
    """Sign steps, or L2-normalised steps scaled to a sign step's L2 length (sqrt of the input size)."""
    if rule == "sign":
        return grad.sign()
    flat = grad.flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return (unit * flat.shape[1] ** 0.5).reshape(grad.shape)


def _restarts(settings: AdaptiveSettings, lams, supports) -> list[tuple[str, str, float, float]]:
    rules = settings.step_rules if settings.norm == "linf" else ("l2",)
    return [(support, rule, factor, lam) for support in supports for lam in lams for rule in rules
            for factor in settings.step_factors]


def adaptive_attack(hardened, x: np.ndarray, y: np.ndarray, settings: AdaptiveSettings, *,
                    input_range: tuple[float, float], lams: tuple[float, ...] | None = None,
                    supports: tuple[str, ...] | None = None, judge: Judge | None = None,
                    reference: torch.Tensor | None = None, proxy=None) -> dict[str, Any]:
    """Adversarial inputs against the classifier and the modelled detectors; see the module docstring.

    ``proxy``: a bundle of the same classifier hardened with another key, whose surrogates (key-known to it)
    model the target's detectors; implies a key-unknown attacker.  Returns ``x_adv``, the methods modelled,
    and ``won``: per input, whether the in-loop judgement found a perturbation that fools the classifier and
    (for ``lam > 0``) raises no alarm.
    """
    if hardened.policy is None:
        raise HardenError("the hardened model is not calibrated")
    supports = tuple(supports if supports is not None else settings.supports)
    lams = tuple(lams if lams is not None else settings.lams)
    replace(settings, supports=supports, lams=lams).validate()
    attacker = KEY_UNKNOWN if proxy is not None else settings.attacker
    model_of = proxy if proxy is not None else hardened
    knowledge = Knowledge(attacker if proxy is None else KEY_KNOWN, reference, dict(settings.surrogate))
    surrogates = surrogates_for(model_of, knowledge)
    policy = _Policy.of(model_of, surrogates)
    own_judgement = attacker == KEY_UNKNOWN or judge is None
    lo, hi = input_range
    eps = float(settings.eps)
    classifier = _Target(hardened.classifier, {})
    detector = _Target(model_of.classifier, surrogates)
    x_all = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y_all = torch.as_tensor(np.asarray(y)).long()
    detector.prepare(x_all)

    def attack_batch(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch; under torchrun each rank attacks its own batches (harden.core.distributed)."""
        xb, yb = x_all[part], y_all[part]
        best, done = xb.clone(), torch.zeros(len(xb), dtype=torch.bool)
        # a row not won yet keeps its fooling iterate with the lowest combined score the attacker can see
        best_score = torch.full((len(xb),), float("inf"), dtype=torch.float64)
        for support, rule, factor, lam in _restarts(settings, lams, supports):
            rows = torch.nonzero(~done).flatten()
            if len(rows) == 0:
                break
            xr, yr = xb[rows], yb[rows]
            movable = _movable(xr, lo, support)
            step = settings.step() * factor
            adv, hit = xr.clone(), torch.zeros(len(rows), dtype=torch.bool)
            if lam:
                with torch.no_grad():
                    exact_scores = policy.scores(detector(xr, smooth=False)[1])
            for _ in range(settings.steps):
                adv = adv.detach().requires_grad_(True)
                if lam:
                    logits, smooth = detector(adv, smooth=True)
                    term = policy.detector_term(smooth, exact_scores, settings.gate)
                    if proxy is not None:   # the margin is the target classifier's (its weights are known)
                        logits = classifier(adv, smooth=True)[0]
                else:
                    logits, term = classifier(adv, smooth=True)[0], 0.0
                objective = _margin(logits, yr, settings.kappa).double() - lam * term
                grad, = torch.autograd.grad(objective.sum(), adv)
                with torch.no_grad():
                    # masked before normalising: an L2 step's whole length goes to the values that may move
                    direction = _direction(grad * movable, rule if settings.norm == "linf" else "l2")
                    adv = _project(adv + step * direction, xr, eps, settings.norm, lo, hi)
                    if not lam:   # blind to the detector: its first misclassified iterate counts, alarm or not
                        fooled = classifier(adv, smooth=False)[0].argmax(1) != yr
                        success = fooled & ~hit
                    else:
                        logits, exact = detector(adv, smooth=False)
                        exact_scores = policy.scores(exact)
                        if proxy is not None:
                            logits = classifier(adv, smooth=False)[0]
                        fooled = (logits.argmax(1) != yr) & ~hit
                        combined = policy.combined(exact_scores)
                        if own_judgement:
                            success = fooled & (combined <= 0)
                        else:   # the shipped graph decides, on the rows the classifier gets wrong
                            success = torch.zeros_like(fooled)
                            candidates = torch.nonzero(fooled).flatten()
                            if len(candidates):
                                predicted, alarm = judge(adv[candidates].numpy())
                                success[candidates] = ((torch.as_tensor(np.asarray(predicted)) != yr[candidates])
                                                       & ~torch.as_tensor(np.asarray(alarm, dtype=bool)))
                        better = fooled & ~success & (combined < best_score[rows])
                        best[rows[better]] = adv[better]
                        best_score[rows[better]] = combined[better]
                    best[rows[success]] = adv[success]
                    hit |= success
                if bool(hit.all()):
                    break
            done[rows[hit]] = True
            never = rows[~hit & torch.isinf(best_score[rows])]   # nothing fooling found: the latest last iterate
            best[never] = adv.detach()[~hit & torch.isinf(best_score[rows])]
        return best, done

    parts = map_chunks(len(x_all), settings.batch_size, attack_batch)
    out = torch.cat([p[0] for p in parts]) if parts else x_all.clone()
    won = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
    return {"x_adv": out.numpy(), "methods": list(surrogates), "won": won.numpy(), "attacker": attacker,
            "proxy": proxy is not None}


def render_adaptive(report: dict):
    """A rich table of ``harden.evaluation.evaluate.evaluate_adaptive``'s report: the undefended baseline and the type II rows."""
    from rich.table import Table

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    norm = "L-inf" if report.get("norm", "linf") == "linf" else "L2"
    table = Table(title=f"adaptive attack on {', '.join(report['methods'])} ({norm} eps {report['eps']:g}, "
                        f"{report['steps']} steps)",
                  caption=f"{report['n_correct']} of {report['n']} inputs originally correct; rates over those. "
                          "success = fooled and no alarm in the exported graph; gain = undefended fooled - success")
    table.add_column("attack", no_wrap=True)
    for name in ("fooled", "evaded", "success", "gain", "linf", "s"):
        table.add_column(name, justify="right", no_wrap=True)
    lams = ", ".join(f"{v:g}" for v in report["lams"])
    labels = {"original": "original weights (lam 0)", "type_i": "undefended (lam 0)", "type_ii": f"{KEY_KNOWN} (lam {lams})",
              "key_unknown": f"{KEY_UNKNOWN}" + (" (proxy)" if report.get("proxy") else "")}
    base = report["type_i"]["fooled"]
    for key, label in labels.items():
        if key not in report:
            continue
        row = report[key]
        if "skipped" in row:
            table.add_row(label, "-", "-", "-", "-", "-", "-")
            continue
        if key == "original":
            linf = "-" if row["mean_linf"] is None else f"{row['mean_linf']:.3f}"
            table.add_row(label, pct(row["fooled"]), "-", "-", "-", linf, f"{row['seconds']:.1f}")
            continue
        gain = None if key == "type_i" or base is None or row["success"] is None else base - row["success"]
        linf = "-" if row["mean_linf"] is None else f"{row['mean_linf']:.3f}"
        table.add_row(label, pct(row["fooled"]), pct(row["evaded"]), pct(row["success"]),
                      "-" if gain is None else f"{100 * gain:+.1f}", linf, f"{row['seconds']:.1f}")
    if report.get("key_unknown", {}).get("same_as"):
        table.caption += f". {KEY_UNKNOWN}: these methods have no keyed part, the same attacker as {KEY_KNOWN}"
    for key in ("type_ii", "key_unknown"):
        if "skipped" in report.get(key, {}):
            table.caption += f". {labels[key]}: {report[key]['skipped']}"
    return table
