"""The detect-or-robust certificate as a training forward: natural logits and a differentiable lower bound of the
true class's margin over the eps-box intersected with the no-alarm region (interval bounds, traps capped).

This is ``harden certify --bounds ibp``'s computation (design section 6) in a form autograd goes through: each
trap's pre-activation upper bound is lowered to its no-alarm limit (relu(z) <= T <=> z <= T) before later layers
read it, the margin is folded into the last linear layer, and a sample where some trap's lower bound already
exceeds its limit alarms everywhere in its box (its certificate holds whatever the margin says).  Without caps
it is the plain robust certificate.

One stacked pass (``harden.train.stacked_bounds``) when every layer allows it, checked once against the general
path (natural pass plus ``harden.bounds.propagate``) before it is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.margin import final_linear, folded_margin_lower, subtracted_margin_lower
from harden.bounds.propagate import propagate
from harden.graph.analyse import feature_extractor
from harden.train.graphs import bounds_graph
from harden.train.stacked_bounds import checked_once, stacked_runner


@dataclass
class CertificatePass:
    """One batch's figures; per-site tuples are (natural, lower, upper) pre-activations at the masked positions
    (the upper bound before its cap)."""

    logits: torch.Tensor
    sites: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    margin: torch.Tensor        # [N] lower bound of min_{j != y} logit_y - logit_j over the (capped) box
    always: torch.Tensor        # [N] bool: some trap's lower bound exceeds its limit (every input alarms)


class MarginBounds:
    """``__call__(x, y, eps, caps)`` -> :class:`CertificatePass`; ``caps`` per pre-activation name: the limits
    [count] of its masked positions, or None for the plain box (robust certificate)."""

    def __init__(self, gm: fx.GraphModule, pre: list[str], masks: list[torch.Tensor], input_range):
        self.gm = gm
        self.pre = list(pre)
        self.masks = list(masks)
        self.input_range = input_range
        fold = final_linear(gm)
        self.fold_module = None
        if fold is not None and fold.op == "call_module" and len(fold.all_input_nodes) == 1:
            self.fold_module = gm.get_submodule(fold.target)
            self.through = fold.all_input_nodes[0].name
        else:
            self.through = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
        self.natural = feature_extractor(gm, self.pre)
        self.bounds = bounds_graph(gm, self.pre + [self.through])
        self.stacked = stacked_runner(gm, dict(zip(self.pre, self.masks)), through=self.through)
        self.stacked_checked = False

    def _margin(self, last: Interval, y: torch.Tensor) -> torch.Tensor:
        if self.fold_module is not None and last.dim() == 2:
            return folded_margin_lower(last, self.fold_module.weight, self.fold_module.bias, y)
        if self.fold_module is not None:   # the layer's input is not [N, d]: bound the logits, then subtract
            half = self.fold_module.weight * 0.5
            centre = F.linear(last.hi + last.lo, half, self.fold_module.bias)
            radius = F.linear(last.hi - last.lo, half.abs())
            last = Interval(centre - radius, centre + radius)
        return subtracted_margin_lower(last, y)

    def _always(self, sites, caps) -> torch.Tensor:
        n = sites[0][0].shape[0] if sites else 0
        always = torch.zeros(n, dtype=torch.bool, device=sites[0][0].device if sites else None)
        if caps:
            for name, (_, lo, _) in zip(self.pre, sites):
                if name in caps:
                    always |= (lo > caps[name]).any(dim=1)
        return always

    def general(self, x: torch.Tensor, y: torch.Tensor, box: Interval, caps) -> CertificatePass:
        logits, *pre = self.natural(x)
        uncapped: dict[str, torch.Tensor] = {}
        clamp = {name: _cap_clamp(mask, caps[name], uncapped, name) for name, mask in zip(self.pre, self.masks)
                 if caps and name in caps}
        *bounds, last = propagate(self.bounds, box, clamp=clamp).output
        gather = [lambda t, m=m: t.flatten(1).index_select(1, m) for m in self.masks]
        sites = [(g(a), g(b.lo), g(uncapped.get(name, b.hi)))
                 for name, g, a, b in zip(self.pre, gather, pre, bounds)]
        return CertificatePass(logits, sites, self._margin(last, y), self._always(sites, caps))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float,
                 caps: dict[str, torch.Tensor] | None = None) -> CertificatePass:
        box = Interval.from_box(x, eps, self.input_range)
        return checked_once(self, lambda: self.general(x, y, box, caps), lambda: self._stacked(x, y, box, caps),
                            _close)

    def _stacked(self, x, y, box, caps) -> CertificatePass:
        logits, sites, (_, lo, hi) = self.stacked(x, box, self.pre, caps)
        return CertificatePass(logits, sites, self._margin(Interval(lo, hi), y), self._always(sites, caps))


def _cap_clamp(mask: torch.Tensor, cap: torch.Tensor, uncapped: dict, name: str):
    """The interval with the upper bounds at ``mask`` lowered to ``cap``; the bound before goes to ``uncapped``."""

    def clamp(iv: Interval) -> Interval:
        uncapped[name] = iv.hi
        per_sample = iv.hi[0].numel()
        dense = torch.full((per_sample,), float("inf"), dtype=iv.hi.dtype, device=iv.hi.device).scatter(0, mask, cap)
        return Interval(iv.lo, torch.minimum(iv.hi, dense.reshape(iv.hi.shape[1:])))

    return clamp


def _close(reference: CertificatePass, candidate: CertificatePass, tol: float = 1e-4) -> bool:
    pairs = [(reference.logits, candidate.logits), (reference.margin, candidate.margin)]
    pairs += [(a, b) for ref, got in zip(reference.sites, candidate.sites) for a, b in zip(ref, got)]
    with torch.no_grad():
        finite = [(a.nan_to_num(posinf=0.0, neginf=0.0), b.nan_to_num(posinf=0.0, neginf=0.0)) for a, b in pairs]
        return bool(torch.equal(reference.always, candidate.always)) and all(
            a.shape == b.shape and float((a - b).abs().max()) <= tol * (1.0 + float(a.abs().max()))
            for a, b in finite)
