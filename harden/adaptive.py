"""Type II (adaptive) attacks: PGD against the classifier AND a differentiable stand-in of its detectors.

A detector that quantises, thresholds or runs an SVM has no useful gradient,
so an attacker who knows it replaces it by a *surrogate*: a smooth function
close to the detector's raw score (SafetyNet: sigmoid codes and a wider RBF,
the paper's section 3).  Surrogates are registered per method name
(:func:`register_surrogate`); a method without one cannot be attacked
adaptively, and a bundle none of whose methods has one is refused.

The attack is L-inf PGD on ``margin - lam * sum_m (smooth raw_m) / scale_m``,
where margin is the Carlini-Wagner margin (best other logit minus the true
one) capped at ``kappa``: once an input is misclassified the steps go to
hiding it.  After every step each input is checked with the surrogates'
*exact* scores (the real detector, not the smoothed one) against the
calibrated thresholds; the first perturbation that fools the classifier and
raises none of the modelled alarms is kept.  Every ``lam`` in ``lams`` is a
restart on the inputs not yet won, and so is every *support* in
``supports``: ``all`` moves every input value, ``ink`` only those where the
clean input is above the lower end of the input range (the digit's strokes on
MNIST), a constraint an attacker picks once it knows that detectors reading
early layers see any change of a blank background.  ``lam = 0`` with support
``all`` is the type I baseline: the same PGD, blind to the detector (it keeps
its first misclassified iterate).  The verdict on the returned inputs is the
caller's (harden evaluate scores them through the exported ONNX graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from harden.errors import HardenError
from harden.registry import Registry


class Surrogate(Protocol):
    """A differentiable stand-in for one fitted method's raw score (higher = more suspicious)."""

    nodes: list[str]   # classifier graph nodes it reads, in the order ``raw`` receives them

    def prepare(self, acts: list[torch.Tensor]) -> None:
        """Statistics from clean inputs (e.g. sigmoid widths); called once before the attack."""

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        """[N] raw score: smoothed (differentiable) or exact (equal to the shipped detector's)."""


SurrogateFactory = Callable[[Any, Any, dict], Surrogate]   # (hardened model, fitted method, settings) -> surrogate
SURROGATES: Registry[SurrogateFactory] = Registry("adaptive surrogate")


def register_surrogate(method_name: str) -> Callable[[SurrogateFactory], SurrogateFactory]:
    return SURROGATES.register(method_name)


SUPPORTS = ("all", "ink")


@dataclass
class AdaptiveSettings:
    eps: float = 0.1
    steps: int = 100
    step_size: float | None = None        # default max(eps / 10, 2.5 eps / steps)
    lams: tuple[float, ...] = (1.0, 10.0)  # detector weight; each is a restart on the inputs not yet won
    supports: tuple[str, ...] = SUPPORTS   # which input values may move; each is a restart too
    kappa: float = 2.0                    # cap on the classifier margin
    batch_size: int = 256
    surrogate: dict[str, Any] = field(default_factory=dict)   # per-surrogate settings (temperature, widen, ...)

    def step(self) -> float:
        return float(self.step_size) if self.step_size is not None else max(self.eps / 10, 2.5 * self.eps / self.steps)


def surrogates_for(hardened, settings: dict | None = None) -> dict[str, Surrogate]:
    """A surrogate for every method of the bundle that has one; an error if none has."""
    from harden.methods import load_all  # noqa: F401  (method modules register their surrogates)

    found = {m.name: SURROGATES.get(m.name)(hardened, m, dict(settings or {})) for m in hardened.methods if m.name in SURROGATES}
    if not found:
        names = ", ".join(m.name for m in hardened.methods)
        raise HardenError(f"no adaptive attack for this bundle's methods ({names}); methods with an adaptive "
                          f"surrogate: {', '.join(SURROGATES.names()) or 'none'}")
    return found


class _Target(torch.nn.Module):
    """Logits and every surrogate's raw score from one pass through the classifier."""

    def __init__(self, hardened, surrogates: dict[str, Surrogate]):
        super().__init__()
        from harden.graph.analyse import feature_extractor

        self.surrogates = surrogates
        self.nodes = list(dict.fromkeys(n for s in surrogates.values() for n in s.nodes))
        self.extractor = feature_extractor(hardened.classifier, self.nodes).eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)

    def _acts(self, acts: dict[str, torch.Tensor], surrogate: Surrogate) -> list[torch.Tensor]:
        return [acts[n] for n in surrogate.nodes]

    def prepare(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            _, *values = self.extractor(x)
        acts = dict(zip(self.nodes, values))
        for s in self.surrogates.values():
            s.prepare(self._acts(acts, s))

    def forward(self, x: torch.Tensor, smooth: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, *values = self.extractor(x)
        acts = dict(zip(self.nodes, values))
        return logits, {name: s.raw(self._acts(acts, s), smooth) for name, s in self.surrogates.items()}


def _margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa)


def adaptive_attack(hardened, x: np.ndarray, y: np.ndarray, settings: AdaptiveSettings, *,
                    input_range: tuple[float, float], lams: tuple[float, ...] | None = None,
                    supports: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Adversarial inputs against the classifier and the modelled detectors; see the module docstring.

    Returns ``x_adv``, the methods modelled, and ``won``: per input, whether
    the in-loop exact check found a perturbation that fools the classifier
    and (for ``lam > 0``) raises none of the modelled alarms.
    """
    if hardened.policy is None:
        raise HardenError("the hardened model is not calibrated")
    if not settings.eps >= 0 or settings.steps < 1:
        raise HardenError(f"adaptive attack: eps must be >= 0 and steps >= 1; got eps={settings.eps}, steps={settings.steps}")
    supports = tuple(supports if supports is not None else settings.supports)
    unknown = [s for s in supports if s not in SUPPORTS]
    if unknown or not supports:
        raise HardenError(f"adaptive attack: support {unknown or supports} is not one of {', '.join(SUPPORTS)}")
    surrogates = surrogates_for(hardened, settings.surrogate)
    names = [m.name for m in hardened.methods]
    thresholds = {n: float(hardened.policy.thresholds[names.index(n)]) for n in surrogates}
    scales = {n: float(hardened.policy.scales[names.index(n)]) for n in surrogates}
    lo, hi = input_range
    eps, step = float(settings.eps), settings.step()
    target = _Target(hardened, surrogates)
    x_all = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y_all = torch.as_tensor(np.asarray(y)).long()
    target.prepare(x_all)
    out = x_all.clone()
    won = torch.zeros(len(x_all), dtype=torch.bool)
    for start in range(0, len(x_all), settings.batch_size):
        xb, yb = x_all[start : start + settings.batch_size], y_all[start : start + settings.batch_size]
        best, done = xb.clone(), torch.zeros(len(xb), dtype=torch.bool)
        restarts = [(support, lam) for support in supports for lam in (lams if lams is not None else settings.lams)]
        for support, lam in restarts:
            movable = (xb > lo).to(xb.dtype) if support == "ink" else torch.ones_like(xb)
            adv = xb.clone()
            for _ in range(settings.steps):
                adv = adv.detach().requires_grad_(True)
                logits, smooth = target(adv, smooth=True)
                detector = sum(smooth[n] / scales[n] for n in surrogates) if lam else 0.0
                objective = _margin(logits, yb, settings.kappa).double() - lam * detector
                grad, = torch.autograd.grad(objective.sum(), adv)
                with torch.no_grad():
                    adv = adv + step * grad.sign() * movable
                    adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(lo, hi)
                    logits, exact = target(adv, smooth=False)
                    # lam = 0 is blind to the detector: its first misclassified iterate counts, alarm or not
                    quiet = torch.stack([exact[n] <= thresholds[n] for n in surrogates]).all(0) if lam else True
                    success = (logits.argmax(1) != yb) & quiet & ~done
                    best[success] = adv[success]
                    done |= success
                if bool(done.all()):
                    break
            best[~done] = adv.detach()[~done]  # no win: the last iterate of the last restart
            if bool(done.all()):
                break
        out[start : start + settings.batch_size] = best
        won[start : start + settings.batch_size] = done
    return {"x_adv": out.numpy(), "methods": list(surrogates), "won": won.numpy()}


def render_adaptive(report: dict):
    """A rich table of ``harden.evaluation.evaluate_adaptive``'s report: type I baseline and type II rows."""
    from rich.table import Table

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    table = Table(title=f"adaptive attack on {', '.join(report['methods'])} (L-inf eps {report['eps']:g}, "
                        f"{report['steps']} steps)",
                  caption=f"{report['n_correct']} of {report['n']} inputs originally correct; rates over those")
    table.add_column("attack", no_wrap=True)
    for name in ("fooled", "evaded", "fooled+evaded", "linf", "seconds"):
        table.add_column(name, justify="right", no_wrap=True)
    lams = ", ".join(f"{v:g}" for v in report["lams"])
    supports = ", ".join(report.get("supports", []))
    for key, label in (("type_i", "type I (lam 0, all)"), ("type_ii", f"type II (lam {lams}; {supports})")):
        row = report[key]
        linf = "-" if row["mean_linf"] is None else f"{row['mean_linf']:.3f}"
        table.add_row(label, pct(row["fooled"]), pct(row["evaded"]), pct(row["success"]), linf, f"{row['seconds']:.1f}")
    return table
