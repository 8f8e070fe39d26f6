"""Certifiable Taboo Trap (paper 000): keyed masks over site activations, an alarm when a masked neuron exceeds T.

The check is a gather of the masked positions (``index_select``), not a
full-tensor multiply by the mask, so its cost does not grow with the size of
the activation: the paper's point is near-zero runtime overhead.

A site is any element-wise activation (:data:`harden.graph.ops.SITE_OPS`); by default the 8 deepest.  A trap
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

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harden.core.options import OptionSet, option
from harden.graph.analyse import collect, describe
from harden.graph.trace import module_path, site_keys, sites as graph_sites
from harden.methods.base import (
    FitContext,
    FittedMethod,
    Method,
    key_fingerprint,
    key_seed,
    layers_option,
    register_method,
    select_sites,
)
from harden.train.eps_search import EPS_RULES
from harden.train.finetune import ANNEAL, DEFAULT_STEPS, TRAP_RULES, TRAP_SCALES, FinetuneConfig
from harden.train.objectives import OBJECTIVES


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

    def _joined(self, prefix: str) -> torch.Tensor:
        return torch.cat([getattr(self, f"{prefix}_{i}") for i in range(len(self.sizes))])

    def forward(self, *activations: torch.Tensor) -> torch.Tensor:
        # Every site's trap neurons gathered and joined, then ONE subtraction and ONE max over them all: the
        # same numbers as the max over sites of each site's max (a max is exact), in 3 graph nodes instead of
        # 3 per site (17 sites on a ResNet-18: onnxruntime's cost per node was a good part of the head's).
        gathered = torch.cat([a.flatten(1).index_select(1, self.trap(i)[0]) for i, a in enumerate(activations)],
                             dim=1)
        excess = gathered - self._joined("thresholds")
        if self.scaled:
            excess = excess / self._joined("scales")
        return excess.amax(dim=1)


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


_FT = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
OBJECTIVE_NAMES = tuple(OBJECTIVES.names())


@dataclass(frozen=True)
class CTTOptions(OptionSet):
    """What every CTT variant takes: where the traps go."""

    # The 8 deepest sites (every site of a smaller model): reading a site costs onnxruntime a layout conversion of
    # the whole map, most on the large early ones, and on the deep suite pairs the deep sites carry the detection
    # (docs/results/ctt.md, "Which sites").
    layers: str = layers_option("deepest:8")
    mask_ratio: float = option(0.01, "fraction of each site's neurons that are traps (at least one per site)",
                               minimum=0.0, strict=True, maximum=1.0)
    trap_placement: str = option("uniform", "uniform: keyed traps anywhere | quiet: only positions constant on the "
                                            "training split (catches DeepFool, but alarms on slightly noisy inputs)",
                                 choices=TRAP_PLACEMENTS)


@dataclass(frozen=True)
class CTTLiteOptions(CTTOptions):
    quantile: float = option(1.0, "per-trap threshold: this quantile of the neuron on the training split "
                                  "(1 = its natural maximum)", minimum=0.0, strict=True, maximum=1.0)


@dataclass(frozen=True)
class CTTFinetuneOptions(CTTOptions):
    """Fine-tuning with cross-entropy + alpha (L_C + detection_weight L_D) on interval bounds of an eps-box."""

    eps: float | str = option("scaled", "L-inf radius of the certified box in fine-tuning (input units); scaled: "
                                        "0.02 x the FGSM eps that halves the model's calibration accuracy (the paper's "
                                        "3e-3 on MNIST); auto: the paper's grid search (harden.train.eps_search)",
                              minimum=0.0, strict=True, keywords=EPS_RULES)
    threshold: float = option(_FT["threshold"], "trap threshold T of the losses", minimum=0.0, strict=True)
    steps: int | None = option(None, "optimisation step budget; stops earlier once the calibration L_C converges "
                                     "(patience)", minimum=1, default_text=str(DEFAULT_STEPS))
    epochs: int | None = option(None, "exactly this many epochs, no early stop (instead of steps)", minimum=1)
    check_every: int | None = option(None, "steps between calibration checks (default: one epoch, clamped to "
                                           "[10, 50])", minimum=1)
    patience: int = option(_FT["patience"], "stop after this many checks without a 1% better calibration L_C "
                                            "(0: train the whole budget)", minimum=0)
    min_improvement: float = option(_FT["min_improvement"], "relative L_C improvement that resets the patience",
                                    minimum=0.0, maximum=0.999)
    alpha: float = option(_FT["alpha"], "weight of L_C", minimum=0.0, strict=True)
    alpha_growth: float = option(_FT["alpha_growth"], "alpha is multiplied by this every alpha_every epochs",
                                 minimum=0.0, strict=True)
    alpha_every: int | None = option(None, "epochs between alpha increases (0: never)", minimum=0,
                                     default_text="4; 0 for detect-or-robust and robust")
    lr: float | None = option(None, "learning rate (RMSProp, no weight decay)", minimum=0.0, strict=True,
                              default_text="3e-4")
    detection_weight: float = option(_FT["detection_weight"], "weight of L_D relative to L_C", minimum=0.0)
    fire_margin: float = option(_FT["fire_margin"], "L_C asks the certified bound to clear T + this (0: the paper)",
                                minimum=0.0)
    loose_weight: float = option(_FT["loose_weight"], "ctt-strict: weight of the added L_LC term that keeps traps "
                                                      "sensitive", minimum=0.0)
    anneal: str = option(_FT["anneal"], "what alpha's growth applies to: detection (L_D only, after L_C) | both",
                         choices=ANNEAL)
    trap_rule: str = option(_FT["trap_rule"], "exported trap thresholds: fixed (T) | natural (max(T, the natural "
                                              "maximum on the training split))", choices=TRAP_RULES)
    trap_scale: str = option(_FT["trap_scale"], "std: the calibrated shift moves each trap by its natural spread | "
                                                "none: one shift for all", choices=TRAP_SCALES)
    batch_size: int = option(_FT["batch_size"], "training batch size", minimum=1)
    # The fine-tuning objective (issue 14; harden.train.objectives, docs/results/detect-or-robust.md).
    objective: str = option(_FT["objective"], "what fine-tuning minimises: ctt (the paper's L_D + L_C) | "
                                              "detect-or-robust (every input of the eps-box keeps its label or alarms, "
                                              "by interval bounds: the certificate harden certify reports) | robust "
                                              "(the label alone, traps ignored: the baseline)", choices=OBJECTIVE_NAMES)
    cert_margin: float = option(_FT["cert_margin"], "detect-or-robust / robust: the hinge asks the certified "
                                                    "margin's lower bound to clear this", minimum=0.0)
    eps_warmup: float | None = option(None, "share of the step budget over which the training eps grows from 0 to "
                                            "eps", minimum=0.0, maximum=1.0,
                                      default_text="0.5 for detect-or-robust and robust, 0 for ctt")

    def check(self, owner: str) -> None:
        from harden.errors import HardenError

        if self.steps is not None and self.epochs is not None:
            raise HardenError(f"{owner}: give steps or epochs, not both")

    def finetune_overrides(self) -> dict[str, Any]:
        """The FinetuneConfig fields these options set (None: the config's own default)."""
        names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"eps", "threshold"}
        return {k: v for k, v in self.to_dict().items() if k in names and v is not None}


class _CTTBase(Method):
    """Site choice and masks shared by every CTT variant."""

    def plan(self, ctx: FitContext) -> tuple[list[str], dict[str, torch.Tensor], dict[str, int]]:
        settings = ctx.settings
        site_nodes = graph_sites(ctx.gm)
        paths = {n.name: module_path(n) for n in site_nodes}
        chosen = select_sites([n.name for n in site_nodes], paths, settings.layers)
        infos = {i.name: i for i in describe(ctx.gm, ctx.data.train.x[:2])}
        sizes = {s: int(np.prod(infos[s].shape)) for s in chosen}
        self.seeds = site_keys(ctx.gm, [n for n in site_nodes if n.name in chosen])
        masks = make_masks(ctx.options.key, sizes, settings.mask_ratio, self.seeds)
        if settings.trap_placement == "quiet":
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
            "mask_ratio": ctx.settings.mask_ratio,
            "trap_placement": ctx.settings.trap_placement,
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
    option_set = CTTLiteOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        chosen, masks, sizes = self.plan(ctx)
        q = ctx.settings.quantile
        masked = collect(ctx.gm, chosen, ctx.data.train.x, lambda site, a: a.index_select(1, masks[site]))
        thresholds = {
            s: (masked[s].amax(dim=0) if q >= 1.0 else torch.quantile(masked[s], q, dim=0)) for s in chosen
        }
        return self.finish(ctx, chosen, masks, sizes, thresholds, {"quantile": q, "threshold_rule": "natural upper bound"})


class _CTTFinetuned(_CTTBase):
    """CTT-loose / CTT-strict: T fixed small, the classifier fine-tuned with the CTT losses."""

    finetunes = True
    option_set = CTTFinetuneOptions
    kind: str

    def fit(self, ctx: FitContext) -> FittedMethod:
        from harden.train.finetune import finetune_ctt, history_json

        chosen, masks, sizes = self.plan(ctx)
        o, s = ctx.options, ctx.settings
        eps = s.eps   # a number, "auto" (the grid search) or "scaled" (harden.train.eps_search)
        extra: dict[str, Any] = {}
        if eps == "scaled":
            from harden.train.eps_search import SCALED_FRACTION, scaled_eps

            eps, strength = scaled_eps(ctx.gm, ctx.data.calibration.x, ctx.data.calibration.y,
                                       ctx.data.input_range, ctx.data.num_classes)
            extra["eps_rule"] = {"rule": "scaled", "fraction": SCALED_FRACTION, "attack": strength.to_json()}
        auto = eps == "auto"
        cfg = FinetuneConfig(kind=self.kind, threshold=s.threshold, fpr=o.fpr, seed=o.seed, device=o.device,
                             **({} if auto else {"eps": eps}), **s.finetune_overrides())
        cfg.check()
        train = (ctx.data.train.x, ctx.data.train.y)
        calibration = (ctx.data.calibration.x, ctx.data.calibration.y)
        if auto:
            from harden.train.eps_search import search_eps

            search = search_eps(ctx.gm, chosen, masks, train, calibration, ctx.data.input_range,
                                ctx.data.num_classes, cfg,
                                lambda t, sc: self.finish(ctx, chosen, masks, sizes, t, {}, sc), progress=ctx.progress)
            # The manifest's eps (the default of `harden certify`) is the chosen number, never "auto".
            cfg.eps = search.eps
            extra["eps_search"] = search.to_json()
        history, best, thresholds, scales = finetune_ctt(ctx.gm, chosen, masks, train, calibration,
                                                         ctx.data.input_range, cfg, ctx.progress)
        extra.update({"threshold": s.threshold, "eps": cfg.eps, "trap_rule": cfg.trap_rule,
                      "finetune": {**cfg.__dict__, "best_epoch": best, "best_step": history[best - 1].step if best else 0,
                                   "steps_taken": history[-1].step, "stop_reason": history[-1].stop},
                      "_history": history_json(history)})
        return self.finish(ctx, chosen, masks, sizes, thresholds, extra, scales)


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
