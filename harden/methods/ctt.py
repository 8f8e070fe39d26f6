"""Certifiable Taboo Trap (paper 000): keyed masks over site activations, an alarm when a masked neuron exceeds T.

The check is a gather of the masked positions (``index_select``), not a
full-tensor multiply by the mask, so its cost does not grow with the size of
the activation: the paper's point is near-zero runtime overhead.

A site is any element-wise activation (:data:`harden.graph.ops.SITE_OPS`).  A trap
fires when its neuron exceeds its threshold, whatever the activation: ctt-lite's
threshold is the neuron's natural upper bound on the training split, which a GELU,
SiLU or squeeze-excitation gate has as a ReLU does.  ctt-loose/strict's T is a
small value above the activation's resting value (0 for every activation harden
marks but tanh, -1), which every one of them reaches on a half-line of
pre-activations (a GELU below ~T, a sigmoid gate below ~-9): L_D pushes natural
inputs onto that half-line.  The certificates intersect each masked neuron's
interval with (-inf, threshold]; that means the same for any activation and is
checked by sampling (``harden certify --check``).  Masks are drawn per site from
the key and the site's key (:func:`harden.graph.trace.site_keys`: module path,
op and position), which a state_dict + --arch model and its torch.export program
share: one key gives the same traps in either form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harden.graph.analyse import collect, describe
from harden.graph.trace import module_path, site_keys, sites as graph_sites
from harden.methods.base import (
    FitContext,
    FittedMethod,
    Method,
    key_fingerprint,
    key_seed,
    register_method,
    select_sites,
)


class TrapHead(nn.Module):
    """raw = max over every masked neuron of (activation - T); an alarm at raw > 0 is the paper's rule.

    ``scaled``: raw = max of (activation - T) / s instead, s a per-neuron scale (the neuron's natural spread).
    The calibrated shift t then moves each threshold by t * s rather than by one common t: a trap whose natural
    values never vary keeps its threshold where it is while a noisy one gets the headroom it needs
    (docs/results/ctt.md).
    """

    def __init__(self, sizes: list[int], counts: list[int], scaled: bool = False):
        super().__init__()
        self.sizes = list(sizes)
        self.scaled = scaled
        for i, count in enumerate(counts):
            self.register_buffer(f"indices_{i}", torch.zeros(count, dtype=torch.int64))
            self.register_buffer(f"thresholds_{i}", torch.zeros(count, dtype=torch.float32))
            if scaled:
                self.register_buffer(f"scales_{i}", torch.ones(count, dtype=torch.float32))

    def trap(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"indices_{i}"), getattr(self, f"thresholds_{i}")

    def scales(self, i: int) -> torch.Tensor:
        """Per masked neuron, how many units of activation one unit of the calibrated shift is (1: unscaled)."""
        return getattr(self, f"scales_{i}") if self.scaled else torch.ones_like(self.trap(i)[1])

    def alarm_thresholds(self, i: int, shift: float) -> torch.Tensor:
        """The activation above which each masked neuron alarms once the calibrated shift is applied."""
        return self.trap(i)[1] + shift * self.scales(i)

    def excess(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        """Per sample and masked neuron: activation - T (over s when scaled), shape [N, count_i]."""
        indices, thresholds = self.trap(i)
        excess = activation.flatten(1).index_select(1, indices) - thresholds
        return excess / self.scales(i) if self.scaled else excess

    def forward(self, *activations: torch.Tensor) -> torch.Tensor:
        per_site = [self.excess(i, a).amax(dim=1) for i, a in enumerate(activations)]
        return torch.stack(per_site, dim=1).amax(dim=1)


def make_masks(key: str, site_sizes: dict[str, int], ratio: float,
               seeds: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Sorted flat positions per site; at least one neuron per site; the key seeds every choice, per site by
    ``seeds[site]`` (a key both forms of a model share: :func:`harden.graph.trace.site_keys`), else its name."""
    seeds = seeds or {}
    masks = {}
    for site, size in site_sizes.items():
        generator = torch.Generator().manual_seed(key_seed(key, f"ctt-mask:{seeds.get(site, site)}"))
        count = max(1, min(size, int(round(ratio * size))))
        masks[site] = torch.randperm(size, generator=generator)[:count].sort().values
    return masks


TRAP_PLACEMENTS = ("uniform", "quiet")
QUIET_STD = 1e-3  # a position is "quiet" when its pre-activation's std over the training split is below this


def quiet_masks(ctx: FitContext, chosen: list[str], masks: dict[str, torch.Tensor],
                seeds: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Per site, the same number of traps drawn (seeded by the key) among the positions whose pre-activation is
    constant on the training split (e.g. a conv window that only ever sees background); sites with too few such
    positions fill up with the key's uniform choice.  Such a trap sits exactly at its natural threshold, so any
    perturbation that moves its window upward fires it (docs/results/ctt.md)."""
    from harden.train.finetune import pre_activation

    pres = [pre_activation(ctx.gm, s) for s in chosen]
    with torch.no_grad():
        natural = collect(ctx.gm, pres, ctx.data.train.x, lambda _, a: a, batch_size=500)
    stds = [natural[p].std(dim=0) for p in pres]
    out = {}
    for site, std in zip(chosen, stds):
        count = len(masks[site])
        eligible = torch.nonzero(std < QUIET_STD).flatten()
        generator = torch.Generator().manual_seed(key_seed(ctx.options.key, f"ctt-quiet:{(seeds or {}).get(site, site)}"))
        picked = eligible[torch.randperm(len(eligible), generator=generator)[:count]]
        if len(picked) < count:
            rest = masks[site][~torch.isin(masks[site], picked)][: count - len(picked)]
            picked = torch.cat([picked, rest])
        out[site] = picked.sort().values
    return out


class _CTTBase(Method):
    """Site choice and masks shared by every CTT variant."""

    default_layers = "all"

    def plan(self, ctx: FitContext) -> tuple[list[str], dict[str, torch.Tensor], dict[str, int]]:
        if not 0.0 < ctx.options.mask_ratio <= 1.0:
            from harden.errors import HardenError

            raise HardenError(f"--mask-ratio must lie in (0, 1]; got {ctx.options.mask_ratio}")
        site_nodes = graph_sites(ctx.gm)
        paths = {n.name: module_path(n) for n in site_nodes}
        chosen = select_sites([n.name for n in site_nodes], paths, ctx.options.layers_for(self.name), self.default_layers)
        infos = {i.name: i for i in describe(ctx.gm, ctx.data.train.x[:2])}
        sizes = {s: int(np.prod(infos[s].shape)) for s in chosen}
        self.seeds = site_keys(ctx.gm, [n for n in site_nodes if n.name in chosen])
        masks = make_masks(ctx.options.key, sizes, ctx.options.mask_ratio, self.seeds)
        placement = ctx.options.get("trap_placement") or "uniform"
        if placement not in TRAP_PLACEMENTS:
            from harden.errors import HardenError

            raise HardenError(f"--trap-placement must be one of {', '.join(TRAP_PLACEMENTS)}; got {placement!r}")
        if placement == "quiet":
            masks = quiet_masks(ctx, chosen, masks, self.seeds)
        return chosen, masks, sizes

    def finish(self, ctx: FitContext, chosen, masks, sizes, thresholds: dict[str, torch.Tensor], extra: dict,
               scales: dict[str, torch.Tensor] | None = None) -> FittedMethod:
        head = TrapHead([sizes[s] for s in chosen], [len(masks[s]) for s in chosen], scaled=scales is not None)
        for i, site in enumerate(chosen):
            getattr(head, f"indices_{i}").copy_(masks[site])
            getattr(head, f"thresholds_{i}").copy_(thresholds[site].float())
            if scales is not None:
                getattr(head, f"scales_{i}").copy_(scales[site].float())
        config: dict[str, Any] = {
            "sites": chosen,
            "site_keys": [getattr(self, "seeds", {}).get(s, s) for s in chosen],
            "sizes": [sizes[s] for s in chosen],
            "counts": [len(masks[s]) for s in chosen],
            "mask_ratio": ctx.options.mask_ratio,
            "trap_placement": ctx.options.get("trap_placement") or "uniform",
            "key_fingerprint": key_fingerprint(ctx.options.key),
            **extra,
            "trap_scaled": scales is not None,
        }
        return FittedMethod(self.name, config, head, list(chosen), sites=list(chosen))

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        return TrapHead(config["sizes"], config["counts"], scaled=bool(config.get("trap_scaled", False)))


@register_method
class CTTLite(_CTTBase):
    """No training: T per masked neuron = its natural upper bound on the training split (or a high quantile)."""

    name = "ctt-lite"

    def fit(self, ctx: FitContext) -> FittedMethod:
        chosen, masks, sizes = self.plan(ctx)
        q = ctx.options.quantile
        if not 0.0 < q <= 1.0:
            from harden.errors import HardenError

            raise HardenError(f"--quantile must lie in (0, 1]; got {q}")
        masked = collect(ctx.gm, chosen, ctx.data.train.x, lambda site, a: a.index_select(1, masks[site]))
        thresholds = {
            s: (masked[s].amax(dim=0) if q >= 1.0 else torch.quantile(masked[s], q, dim=0)) for s in chosen
        }
        return self.finish(ctx, chosen, masks, sizes, thresholds, {"quantile": q, "threshold_rule": "natural upper bound"})


class _CTTFinetuned(_CTTBase):
    """CTT-loose / CTT-strict: T fixed small, the classifier fine-tuned with the CTT losses."""

    finetunes = True
    kind: str

    def fit(self, ctx: FitContext) -> FittedMethod:
        from harden.train.eps_search import parse_eps
        from harden.train.finetune import FinetuneConfig, finetune_ctt, history_json

        chosen, masks, sizes = self.plan(ctx)
        o = ctx.options
        # Defaults live in FinetuneConfig alone; only what the user gave overrides them.
        given = {name: o.get(name) for name in FINETUNE_OPTIONS if o.get(name) is not None}
        o.eps = parse_eps(o.eps)   # a number, "auto" (the grid search) or "scaled" (harden.train.eps_search)
        extra: dict[str, Any] = {}
        if o.eps == "scaled":
            from harden.train.eps_search import SCALED_FRACTION, scaled_eps

            o.eps, strength = scaled_eps(ctx.gm, ctx.data.calibration.x, ctx.data.calibration.y,
                                         ctx.data.input_range, ctx.data.num_classes)
            extra["eps_rule"] = {"rule": "scaled", "fraction": SCALED_FRACTION, "attack": strength.to_json()}
        auto = o.eps == "auto"
        cfg = FinetuneConfig(kind=self.kind, threshold=o.threshold, fpr=o.fpr, seed=o.seed, device=o.device,
                             **({} if auto else {"eps": o.eps}), **given)
        cfg.check()
        train = (ctx.data.train.x, ctx.data.train.y)
        calibration = (ctx.data.calibration.x, ctx.data.calibration.y)
        if auto:
            from harden.train.eps_search import search_eps

            search = search_eps(ctx.gm, chosen, masks, train, calibration, ctx.data.input_range,
                                ctx.data.num_classes, cfg,
                                lambda t, s: self.finish(ctx, chosen, masks, sizes, t, {}, s), progress=ctx.progress)
            cfg.eps = search.eps
            # The manifest's eps (the default of `harden certify`) is the chosen number, never "auto".
            o.eps = search.eps
            extra["eps_search"] = search.to_json()
        history, best, thresholds, scales = finetune_ctt(ctx.gm, chosen, masks, train, calibration,
                                                         ctx.data.input_range, cfg, ctx.progress)
        extra.update({"threshold": o.threshold, "eps": cfg.eps, "trap_rule": cfg.trap_rule,
                      "finetune": {**cfg.__dict__, "best_epoch": best, "best_step": history[best - 1].step if best else 0,
                                   "steps_taken": history[-1].step, "stop_reason": history[-1].stop},
                      "_history": history_json(history)})
        return self.finish(ctx, chosen, masks, sizes, thresholds, extra, scales)


# Fine-tuning settings a user may give (CLI flags / Options.extra), by FinetuneConfig field name.
FINETUNE_OPTIONS = ("steps", "epochs", "check_every", "patience", "min_improvement", "alpha", "alpha_growth",
                    "alpha_every", "lr", "detection_weight", "fire_margin", "loose_weight", "anneal", "trap_rule",
                    "trap_scale", "batch_size")


@register_method
class CTTLoose(_CTTFinetuned):
    """Fine-tuned so that some eps-perturbation can fire each trap (sub-optimal placement)."""

    name = "ctt-loose"
    kind = "loose"


@register_method
class CTTStrict(_CTTFinetuned):
    """Fine-tuned so that every eps-perturbation fires the traps (optimal placement)."""

    name = "ctt-strict"
    kind = "strict"
