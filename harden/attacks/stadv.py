"""stAdv: spatially transformed adversarial examples (Xiao et al. 2018; thesis 001, sections 2.3 and 4.2).

Per input, a flow field ``r`` (:mod:`harden.core.flow`) is optimised to minimise

    L_adv(warp(x, r)) + tau * L_flow(r)                                   (Eq. 7)

with L_adv the C&W margin of Eq. 5 (targeted: ``max(max_{i != t} Z_i - Z_t, -kappa)``; untargeted:
``max(Z_y - max_{i != y} Z_i, -kappa)``) and L_flow the total variation of Eq. 6, or, with a budget, its
excess ``max(TV - budget, 0)`` (Eq. 14).  tau is searched per input between 0 and 1000 (section 4.2):
after a run at tau, success raises the lower end (a less transformed image is wanted), failure lowers the
upper end, and the next tau is the midpoint.  The optimiser is Adam on the flow, batched (Adam's update is
per element, so the inputs of a batch do not interact).

Every iterate is projected onto the threat before it is judged: each flow component clipped to
[-delta, delta] when ``delta`` > 0, then the field scaled down to TV <= budget (:func:`harden.core.flow.project`).
An input counts as successful only when that projected flow reaches the goal, so a returned adversarial
example always lies inside the budget; among successes the smallest TV is kept.  An input never
successful is returned at its last projected iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harden.core.flow import project, total_variation, warp
from harden.errors import HardenError

TAU_RANGE = (0.0, 1000.0)
SMOOTH = 1e-10   # under the square roots of the TV loss: a gradient where two neighbours agree


@dataclass(frozen=True)
class StAdvSettings:
    tau: float = 0.1           # the first tau of the search (the thesis's 0.1)
    budget: float = 7.0        # TV budget of Eq. 14 (the thesis's 7.0); 0: none (TV is then the plain penalty)
    delta: float = 0.0         # per-pixel flow bound in pixels; 0: none (the thesis's attack has none)
    targeted: bool = False
    kappa: float = 0.0         # the margin's floor: -kappa
    steps: int = 100           # Adam steps per tau
    search_steps: int = 5      # taus tried per input
    lr: float = 0.01           # Adam's step, in pixels

    def check(self) -> None:
        if self.budget < 0 or self.delta < 0 or self.kappa < 0 or self.tau < 0:
            raise HardenError("stadv: tau, budget, delta and kappa must be >= 0")
        if not TAU_RANGE[0] <= self.tau <= TAU_RANGE[1]:
            raise HardenError(f"stadv: tau must lie in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}]")
        if self.steps < 1 or self.search_steps < 1 or not self.lr > 0:
            raise HardenError("stadv: steps and search_steps must be >= 1 and lr > 0")


@dataclass
class StAdvResult:
    x_adv: torch.Tensor        # float32, the inputs' shape
    flow: torch.Tensor         # [N, 2, H, W], inside the budget
    success: torch.Tensor      # bool [N]: the goal reached (target class, or any wrong class)
    tv: torch.Tensor           # [N] Eq. 6 of the returned flow
    tau: torch.Tensor          # [N] the tau of the returned flow (nan where never successful)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """Eq. 5 per sample: how far the goal is from reached (<= 0 once reached), floored at -kappa."""
    chosen = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    best_other = others.amax(dim=1)
    gap = best_other - chosen if targeted else chosen - best_other
    return gap.clamp_min(-kappa)


def _reached(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(dim=1)
    return pred == labels if targeted else pred != labels


def stadv(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: StAdvSettings) -> StAdvResult:
    """One batch: ``labels`` are the targets (targeted) or the true classes (untargeted)."""
    settings.check()
    if x.dim() != 4:
        raise HardenError(f"stadv moves images [N, C, H, W]; got shape {tuple(x.shape)}")
    n = x.shape[0]
    delta = settings.delta or None
    budget = settings.budget or None
    device = x.device
    lower = torch.full((n,), TAU_RANGE[0], dtype=torch.float64, device=device)
    upper = torch.full((n,), TAU_RANGE[1], dtype=torch.float64, device=device)
    tau = torch.full((n,), float(settings.tau), dtype=torch.float64, device=device)
    best_flow = torch.zeros((n, 2) + tuple(x.shape[2:]), dtype=x.dtype, device=device)
    best_tv = torch.full((n,), float("inf"), dtype=x.dtype, device=device)
    best_tau = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    last_flow = best_flow.clone()
    for _ in range(settings.search_steps):
        flow = torch.zeros_like(best_flow, requires_grad=True)
        optimiser = torch.optim.Adam([flow], lr=settings.lr)
        reached_now = torch.zeros(n, dtype=torch.bool, device=device)
        weight = tau.to(x.dtype)
        for step in range(settings.steps + 1):
            tv = total_variation(flow, smooth=SMOOTH)
            logits = model(warp(x, flow))
            with torch.no_grad():
                # The iterate is judged inside the budget: as it is where its TV fits (its logits are at hand),
                # scaled down where it does not (one more forward pass for those inputs only).
                inside, tv_inside = flow.detach().clone(), total_variation(flow.detach())
                reached = _reached(logits.detach(), labels, settings.targeted)
                over = tv_inside > budget if budget is not None else torch.zeros_like(reached)
                if bool(over.any()):
                    scaled = project(inside[over], delta, budget)
                    inside[over], tv_inside[over] = scaled, total_variation(scaled)
                    reached[over] = _reached(model(warp(x[over], scaled)), labels[over], settings.targeted)
                better = reached & (tv_inside < best_tv)
                best_flow[better] = inside[better]
                best_tv[better] = tv_inside[better]
                best_tau[better] = tau[better]
                reached_now |= reached
            if step == settings.steps:
                break
            penalty = (tv - budget).clamp_min(0) if budget is not None else tv
            loss = margin_loss(logits, labels, settings.targeted, settings.kappa) + weight * penalty
            optimiser.zero_grad()
            loss.sum().backward()
            optimiser.step()
            if delta is not None:
                with torch.no_grad():
                    flow.clamp_(-delta, delta)
        with torch.no_grad():
            last_flow = project(flow.detach(), delta, budget)
        # Section 4.2: success -> a larger tau (less transformation), failure -> a smaller one.
        lower = torch.where(reached_now, tau, lower)
        upper = torch.where(reached_now, upper, tau)
        tau = (lower + upper) / 2
    success = torch.isfinite(best_tv)
    flow = torch.where(success.view(-1, 1, 1, 1), best_flow, last_flow)
    with torch.no_grad():
        x_adv = warp(x, flow)
        tv = total_variation(flow)
    return StAdvResult(x_adv.detach(), flow.detach(), success, tv, best_tau)


class StAdvAttack:
    """ART-like ``generate(x, y_onehot)`` over :func:`stadv`, on the estimator's torch model."""

    def __init__(self, model: torch.nn.Module, settings: StAdvSettings, batch_size: int, device):
        self.model, self.settings, self.batch_size, self.device = model, settings, batch_size, device

    def generate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        labels = np.asarray(y).argmax(axis=1)
        out = []
        for start in range(0, len(x), self.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + self.batch_size], dtype=np.float32)).to(self.device)
            yb = torch.from_numpy(labels[start:start + self.batch_size].astype(np.int64)).to(self.device)
            out.append(stadv(self.model, xb, yb, self.settings).x_adv.cpu().numpy())
        return np.concatenate(out) if out else np.asarray(x, dtype=np.float32)
