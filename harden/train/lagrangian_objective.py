"""Fine-tuning for the Lagrangian detect-or-robust certificate (``harden.bounds.lagrangian``), CROWN-IBP style.

Two objectives of ctt-loose / ctt-strict, the pair measured against each other and against ``robust``:

- ``lagrangian``: the hinge relu(kappa - m), m the larger of the interval margin (as ``detect-or-robust``) and the
  CROWN-IBP bound of the combined rows margin_j + sum_k lambda_k (z_k - limit_k): interval intermediate bounds
  with every trap's pre-activation capped at its no-alarm limit, then one backward linear-relaxation pass per
  (sample, wrong class) row in which each trap's pre-activation z_k enters with its multiplier lambda_k >= 0.
  lambda is one trainable value per trap neuron (shared by inputs and classes), lambda = softplus(rho), trained by
  its own Adam on the same loss (one step per training step, from the gradient of the previous step's loss);
  plus L_D (natural inputs stay quiet), as ``detect-or-robust``;
- ``robust-crown``: the same CROWN-IBP hinge on the plain box, traps ignored: the baseline that isolates the
  traps' share from the change of bound (``robust`` bounds the margin by intervals).

The calibration figure that picks the kept check is the share of calibration inputs not certified by the same
bound (with the current lambda, not optimised per input: ``harden certify`` then optimises it per input from 0).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from harden.bounds.crown import LinearBounds
from harden.bounds.interval import Interval
from harden.bounds.lagrangian import Constraint, _first_back, _lower, _seeds
from harden.bounds.margin import final_linear
from harden.core.distributed import map_chunks
from harden.train.ctt_losses import certificate_hinge, detection_hinge
from harden.train.margin_bounds import _cap_clamp
from harden.train.objectives import _Certificate, _fired_masked, _means, register_objective

LAMBDA_LR = 0.05
LAMBDA_START = 0.1


class _CrownCertificate(_Certificate):
    lagrangian: ClassVar[bool]

    def __init__(self, traps):
        super().__init__(traps)
        self.engine = LinearBounds(traps.gm)
        self.fold = final_linear(traps.gm)
        nodes = {n.name: n for n in traps.gm.graph.nodes}
        self.pre_nodes = [nodes[name] for name in traps.pre]
        width = sum(int(m.numel()) for m in traps.masks)
        start = torch.log(torch.expm1(torch.tensor(LAMBDA_START)))
        self.rho = torch.full((width,), float(start), requires_grad=self.lagrangian)
        self.lambda_optimiser = torch.optim.Adam([self.rho], lr=LAMBDA_LR) if self.lagrangian else None

    def multipliers(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def crown_margin(self, x: torch.Tensor, y: torch.Tensor, eps: float, caps) -> torch.Tensor:
        """Per sample, the CROWN-IBP lower bound of min_j (margin_j + sum_k lambda_k (z_k - limit_k)) over the box
        (capped when ``caps``): a lower bound of the margin over the box's quiet inputs."""
        box = Interval.from_box(x, eps, self.traps.input_range)
        clamp = {}
        if caps:
            clamp = {name: _cap_clamp(mask, caps[name], {}, name)
                     for name, mask in zip(self.traps.pre, self.traps.masks) if name in caps}
        values = self.engine.bound_graph(box, "crown-ibp", pre_clamp=clamp).nodes
        n = y.shape[0]
        k = values[next(n_ for n_ in reversed(self.engine.nodes) if n_.op == "output").args[0].name].shape[1]
        classes = torch.arange(k, device=y.device)
        others = classes.expand(n, k)[classes.unsqueeze(0) != y.unsqueeze(1)].reshape(-1)
        rows = torch.arange(n, device=y.device).repeat_interleave(k - 1)
        first, node = _first_back(self.engine, values, y[rows], others, rows, self.fold)
        seeds, bias = {}, 0.0
        if self.lagrangian and caps:
            cons = [Constraint(node_, mask, caps[name])
                    for node_, name, mask in zip(self.pre_nodes, self.traps.pre, self.traps.masks) if name in caps]
            lam = self.multipliers().to(x.dtype).unsqueeze(0).expand(rows.shape[0], -1)
            seeds, bias = _seeds(cons, values, lam)
        return (_lower(self.engine, values, node, first, seeds) + bias).reshape(n, k - 1).amin(dim=1)

    def losses(self, x, y):
        if self.lambda_optimiser is not None and self.rho.grad is not None:
            self.lambda_optimiser.step()      # the previous step's gradient (its loss.backward() filled it)
            self.lambda_optimiser.zero_grad(set_to_none=True)
        cfg = self.cfg
        c = self.bounds(x, y, self.traps.eps, self.caps)
        ce = F.cross_entropy(c.logits, y)
        margin = torch.maximum(c.margin, self.crown_margin(x, y, self.traps.eps, self.caps))
        if self.capped:
            l_d = sum(detection_hinge(nat, cfg.threshold, cfg.quiet_margin) for nat, _, _ in c.sites)
        else:
            l_d = torch.zeros_like(ce)
        return ce, l_d.mean(), certificate_hinge(margin, c.always, cfg.cert_margin).mean()

    @torch.no_grad()
    def score(self, x, y, thresholds, batch=250):
        cfg, caps = self.cfg, self.caps_for(thresholds)

        def chunk_sums(rows: slice):
            xb, yb = x[rows], y[rows]
            c = self.bounds(xb, yb, cfg.eps, caps)
            margin = torch.maximum(c.margin, self.crown_margin(xb, yb, cfg.eps, caps))
            correct = int((c.logits.argmax(1) == yb).sum())
            naturals = [nat for nat, _, _ in c.sites]
            alarms = int(_fired_masked(naturals, [self.limits[i](t) for i, t in enumerate(thresholds)]).sum())
            l_d = float(sum(detection_hinge(nat, cfg.threshold) for nat in naturals).sum()) if naturals else 0.0
            certified = c.always | (margin > 0)
            hinge = float(certificate_hinge(margin, c.always, cfg.cert_margin).sum())
            return correct, alarms, l_d, int((~certified).sum()), hinge

        return _means(map_chunks(len(x), batch, chunk_sums), len(x))


@register_objective
class Lagrangian(_CrownCertificate):
    """detect-or-robust by the Lagrangian CROWN-IBP bound (a trainable multiplier per trap neuron), plus L_D."""

    name = "lagrangian"
    capped = True
    lagrangian = True


@register_objective
class RobustCrown(_CrownCertificate):
    """robust by the CROWN-IBP bound, traps ignored: the baseline of ``lagrangian``."""

    name = "robust-crown"
    capped = False
    lagrangian = False
