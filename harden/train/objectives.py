"""What CTT fine-tuning minimises, by name: a small registry of objectives (``objective`` option of ctt-loose/strict).

Every objective gives the loop, per batch, three batch means it weighs as CE + w_D * L_D + w_C * L_C
(``harden.train.finetune``: alpha, its annealing and the eps schedule stay the loop's), and per calibration check
the figures the loop keeps the best check by and watches for convergence.

- ``ctt`` (default): the paper's L_D and L_C on the traps' interval bounds (L_SC for ctt-strict, L_LC for
  ctt-loose; paper 000, Eq. 5-7).
- ``detect-or-robust``: the certificate ``harden certify`` reports (design section 6) as the loss.  L_C is the
  hinge relu(kappa - m), m a lower bound (interval bounds) of the true class's margin over the eps-box
  intersected with the no-alarm region (every trap at or below its threshold), zero for a sample whose every
  box input alarms; L_D keeps natural inputs quiet.  The caps are the thresholds the head will export
  (``trap_rule``), refreshed at every check.
- ``robust``: the same hinge on the plain box, traps ignored: fine-tuning for certified robustness alone with
  the same loop and budget (the baseline the detect-or-robust objective is measured against).

A new objective subclasses :class:`Objective` and registers with ``@register_objective``; ``defaults`` holds the
fine-tuning settings it changes when the user gives none (applied after the kind's, before the user's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.margin import PRE_ACTIVATION_LIMIT
from harden.bounds.propagate import propagate
from harden.core.distributed import map_chunks
from harden.core.registry import Registry
from harden.graph.ops import canonical_op
from harden.train.ctt_losses import certificate_hinge, certification_hinge, detection_hinge, detection_loss
from harden.train.margin_bounds import MarginBounds

if TYPE_CHECKING:
    from harden.train.finetune import _Traps

# Per calibration check: accuracy, trap FPR, the paper's L_D at T, the objective's figure at the exported
# thresholds (the kept-check rule takes the lowest) and the figure the convergence rule watches.
Scores = tuple[float, float, float, float, float]


class Objective:
    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, traps: "_Traps"):
        self.traps = traps
        self.cfg = traps.cfg

    def refresh(self, thresholds: list[torch.Tensor]) -> None:
        """The thresholds the head would export now (activation units, per site), after every check."""

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def score(self, x: torch.Tensor, y: torch.Tensor, thresholds: list[torch.Tensor], batch: int = 500) -> Scores:
        raise NotImplementedError

    def watch_from(self, total_steps: int) -> int:
        """The first step whose checks count towards convergence (a schedule still moving the target before)."""
        return 0


OBJECTIVES: Registry[type[Objective]] = Registry("fine-tuning objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES.register(cls.name)(cls)
    return cls


def _fired(pre: list[torch.Tensor], masks: list[torch.Tensor], thresholds: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: some masked neuron above its threshold (relu(z) > T <=> z > T for T >= 0)."""
    fired = torch.zeros(len(pre[0]), dtype=torch.bool, device=pre[0].device)
    for a, m, t in zip(pre, masks, thresholds):
        fired |= (a.flatten(1).index_select(1, m) > t).any(dim=1)
    return fired


@register_objective
class PaperCTT(Objective):
    """The paper's L_D + L_C (L_SC for strict, with an added L_LC term; L_LC for loose)."""

    name = "ctt"

    def losses(self, x, y):
        cfg, traps = self.cfg, self.traps
        # L_C on the ReLU's input bounds: [relu(b) >= T] == [b >= T] for T > 0, so the loss is zero exactly
        # where the paper's is, but relu(T - b) keeps a gradient when b < 0 (relu(T - relu(b)) has none there).
        logits, sites = traps.forward(x)
        ce = F.cross_entropy(logits, y)
        t = cfg.threshold
        l_d = sum(detection_hinge(nat, t, cfg.quiet_margin) for nat, _, _ in sites)
        bound = 1 if cfg.kind == "strict" else 2          # lo for L_SC, hi for L_LC
        l_c = sum(certification_hinge(s[bound], t, cfg.fire_margin) for s in sites)
        if cfg.kind == "strict" and cfg.loose_weight:
            l_c = l_c + cfg.loose_weight * sum(certification_hinge(hi, t, cfg.fire_margin) for _, _, hi in sites)
        return ce, l_d.mean(), l_c.mean()

    @torch.no_grad()
    def score(self, x, y, thresholds, batch=500):
        """Accuracy, trap FPR (some masked neuron above its threshold, as the exported head computes it before
        calibration), the paper's L_D at T and the paper's certification loss (no margin) at ``thresholds``;
        last, the certification loss at T itself (what training lowers, and what the convergence rule watches)."""
        traps, cfg = self.traps, self.cfg

        def chunk_sums(rows: slice) -> tuple[int, int, float, float, float]:
            xb, yb = x[rows], y[rows]
            logits, *pre = traps.natural(xb)
            correct = int((logits.argmax(1) == yb).sum())
            alarms = int(_fired(pre, traps.masks, thresholds).sum())
            l_d = float(sum(detection_loss(torch.relu(a), m, cfg.threshold) for a, m in zip(pre, traps.masks)).sum())
            l_c, at_t = 0.0, 0.0
            bounds = propagate(traps.bounds, Interval.from_box(xb, traps.eps, traps.input_range)).output
            for b, m, t in zip(bounds, traps.masks, thresholds):
                bound = getattr(b, "hi" if cfg.kind == "loose" else "lo").flatten(1).index_select(1, m)
                l_c += float(torch.relu(t - bound).sum())
                at_t += float(torch.relu(cfg.threshold - bound).sum())
            return correct, alarms, l_d, l_c, at_t

        return _means(map_chunks(len(x), batch, chunk_sums), len(x))


class _Certificate(Objective):
    """The hinge on the certified margin, over the box intersected with the no-alarm region (``capped``) or not."""

    capped: ClassVar[bool]
    defaults = {"eps_warmup": 0.5, "alpha_every": 0, "lr": 1e-3}

    def __init__(self, traps):
        super().__init__(traps)
        self.bounds = MarginBounds(traps.gm, traps.pre, traps.masks, traps.input_range)
        nodes = {n.name: n for n in traps.gm.graph.nodes}
        self.limits = [PRE_ACTIVATION_LIMIT[canonical_op(traps.gm, nodes[s])] for s in traps.sites]
        self.caps: dict[str, torch.Tensor] | None = None

    def caps_for(self, thresholds: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Each trap's no-alarm limit on its pre-activation, by pre-activation node (None: the plain box)."""
        if not self.capped:
            return None
        return {name: limit(t) for name, limit, t in zip(self.traps.pre, self.limits, thresholds)}

    def refresh(self, thresholds):
        self.caps = self.caps_for([t.detach() for t in thresholds])

    def losses(self, x, y):
        cfg = self.cfg
        c = self.bounds(x, y, self.traps.eps, self.caps)
        ce = F.cross_entropy(c.logits, y)
        if self.capped:
            l_d = sum(detection_hinge(nat, cfg.threshold, cfg.quiet_margin) for nat, _, _ in c.sites)
        else:
            l_d = torch.zeros_like(ce)
        return ce, l_d.mean(), certificate_hinge(c.margin, c.always, cfg.cert_margin).mean()

    @torch.no_grad()
    def score(self, x, y, thresholds, batch=500):
        """Accuracy, trap FPR, the paper's L_D at T, the share of samples NOT certified at the full eps with
        ``thresholds`` (the kept-check rule takes the lowest), and the mean hinge there (convergence)."""
        cfg, caps = self.cfg, self.caps_for(thresholds)

        def chunk_sums(rows: slice) -> tuple[int, int, float, int, float]:
            xb, yb = x[rows], y[rows]
            c = self.bounds(xb, yb, cfg.eps, caps)
            correct = int((c.logits.argmax(1) == yb).sum())
            naturals = [nat for nat, _, _ in c.sites]
            alarms = int(_fired_masked(naturals, [self.limits[i](t) for i, t in enumerate(thresholds)]).sum())
            l_d = float(sum(detection_hinge(nat, cfg.threshold) for nat in naturals).sum()) if naturals else 0.0
            certified = c.always | (c.margin > 0)
            hinge = float(certificate_hinge(c.margin, c.always, cfg.cert_margin).sum())
            return correct, alarms, l_d, int((~certified).sum()), hinge

        return _means(map_chunks(len(x), batch, chunk_sums), len(x))

    def watch_from(self, total_steps: int) -> int:
        return int(round(self.cfg.eps_warmup * total_steps)) if self.cfg.eps_warmup else 0


def _means(chunks: list[tuple], n: int) -> Scores:
    """Per-chunk sums (in chunk order, the same on every rank: harden.core.distributed) as means over n."""
    totals = [0.0] * 5
    for sums in chunks:
        totals = [a + b for a, b in zip(totals, sums)]
    return tuple(v / n for v in totals)


def _fired_masked(masked: list[torch.Tensor], limits: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: some masked pre-activation above its no-alarm limit."""
    fired = torch.zeros(len(masked[0]) if masked else 0, dtype=torch.bool)
    for a, t in zip(masked, limits):
        fired = fired.to(a.device) | (a > t).any(dim=1)
    return fired


@register_objective
class DetectOrRobust(_Certificate):
    """Every input of the eps-box keeps the label or raises the alarm: the hinge on the capped margin, plus L_D."""

    name = "detect-or-robust"
    capped = True


@register_objective
class Robust(_Certificate):
    """Every input of the eps-box keeps the label (traps ignored): the baseline for detect-or-robust."""

    name = "robust"
    capped = False


# The CROWN-IBP objectives (``lagrangian``, ``robust-crown``) register themselves on import.
from harden.train import lagrangian_objective  # noqa: E402,F401
