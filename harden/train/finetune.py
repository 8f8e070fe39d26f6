"""CTT fine-tuning (paper 000, Algorithm 1): cross-entropy + alpha * (w_D * L_D + L_C), alpha annealed upward.

The classifier is trained in eval mode (batch-norm statistics and dropout
frozen) because the interval rules use eval-mode semantics and the
architecture must not change.

Budget: at most ``steps`` optimisation steps (``DEFAULT_STEPS``), the model
scored on the calibration split every ``check_every`` steps; training stops
early once the calibration L_C has not improved by a relative
``min_improvement`` for ``patience`` consecutive checks ("converged"), else at
the budget ("step budget").  A step count, unlike an epoch count, does not
shrink with the training split: 2 epochs were ~94 steps on 3,000 MNIST digits
but ~28 on 840 sklearn digits, too few for L_C to move.  ``epochs`` overrides
all of this: exactly that many epochs, a check at each epoch's end, no early
stop (old bundles and recipes reproduce).  The best check is kept by one
documented rule (see ``_better``).

Knobs beyond the paper's equations (each defaults to the paper's form unless a
measurement in docs/results/ctt.md chose otherwise):

- ``detection_weight`` (w_D): L_D's weight relative to L_C.  With hinge losses
  each trap settles where the samples L_D pushes down balance those L_C pushes
  up, so its natural firing rate falls as w_D grows.
- ``fire_margin``: L_C asks the certified bound to clear T + margin (0: the paper).
- ``loose_weight`` (strict only): L_SC = relu(T - lo) cannot reach zero for a
  trap that is quiet on its own natural input (the eps-box contains that input,
  so lo <= natural <= T); alone it shrinks the trap to a constant sitting at T.
  An added L_LC term keeps the trap sensitive while L_SC pulls its lower bound
  up towards T.
- ``anneal``: "both" grows alpha on w_D * L_D + L_C (Algorithm 1); "detection"
  grows only L_D's weight after L_C has been brought down at a fixed weight
  (appendix A: first reach low L_C, then raise alpha).
- ``trap_rule``: the thresholds the exported head uses.  "fixed": T for every
  trap (the paper).  "natural": max(T, the trap's natural maximum on the
  training split of the fine-tuned model), i.e. the placement B_up <= T_l of
  section 3.3 enforced by construction where fine-tuning left L_D > 0.  Either
  way the combined alarm is then calibrated to --fpr, which shifts every
  trap's threshold by one common amount.
- ``trap_scale``: "std" exports, per trap, the natural standard deviation of its
  pre-activation on the training split (floored at ``scale_floor``) and the head
  divides each trap's excess by it, so the calibrated shift moves each
  threshold in proportion to the trap's own spread; "none": one common shift.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.propagate import propagate
from harden.core.distributed import agree, map_chunks
from harden.errors import HardenError
from harden.graph.analyse import feature_extractor
from harden.train.graphs import bounds_graph, pre_activation  # noqa: F401  (pre_activation: public here too)
from harden.train.objectives import OBJECTIVES
from harden.train.parallel import DataParallel
from harden.train.stacked_bounds import checked_once, stacked_runner

ANNEAL = ("both", "detection")
# Per-kind defaults, chosen across bench/suite on the calibration split (docs/results/ctt.md, "Defaults across the
# suite"): with the step budget, lr 3e-4 and L_D at 0.3 x L_C detected the most on every pair where CTT detects at
# all (LeNet-5 100/100/100% FGSM/BIM/PGD and 99% DeepFool, the MLP 65-73%), against lr 1e-4 with L_D at 0.01
# (72-97% and 0%) and lr 1e-3 (the MLP 0%); no setting tried detects on the digits CNN/VGG or the shapes pairs.
KIND_DEFAULTS = {"strict": {"lr": 3e-4}, "loose": {"lr": 3e-4}}
COMMON_DEFAULTS = {"alpha_every": 4, "eps_warmup": 0.0}
# The step budget when --epochs is not given.  Provisional (600 = ~6 epochs of 3,000 MNIST digits): to be chosen by
# measurement across the model/data suite.  The one place this number lives.
DEFAULT_STEPS = 600
# Default steps between calibration checks: one per epoch, but at most CHECK_EVERY_MAX (a check costs a pass over
# the training split for the natural trap thresholds plus the calibration split with bounds, so on big data a
# check per epoch would be too rare to stop on time) and at least CHECK_EVERY_MIN (on a tiny training split an
# epoch is a few steps and checking that often would cost more than training).
CHECK_EVERY_MAX = 50
CHECK_EVERY_MIN = 10
STOP_REASONS = ("converged", "step budget", "epochs")
TRAP_RULES = ("fixed", "natural")
TRAP_SCALES = ("none", "std")


@dataclass
class FinetuneConfig:
    kind: str                  # "loose" | "strict"
    threshold: float = 1e-4
    eps: float = 3e-3
    steps: int | None = None   # the step budget; None: DEFAULT_STEPS (unused when epochs is given)
    epochs: int | None = None  # given: exactly this many epochs, a check at each epoch's end, no early stop
    check_every: int | None = None  # steps between calibration checks; None: default_check_every(steps per epoch)
    patience: int = 3          # stop after this many consecutive checks without a min_improvement (0: never)
    min_improvement: float = 0.01  # relative improvement of the calibration L_C that resets the patience count
    alpha: float = 1.0         # the weight of L_C (anneal "detection": alpha * detection_weight is L_D's)
    alpha_growth: float = 1.5
    alpha_every: int | None = None  # epochs between alpha increases, in both modes (0: never); None: 4, or the
    #                                  objective's default
    lr: float | None = None    # None: the objective's default, else the kind's (KIND_DEFAULTS)
    detection_weight: float = 0.3   # w_D: L_D's weight relative to L_C (chosen across the suite; see KIND_DEFAULTS)
    quiet_margin: float = 0.0  # L_D pushes natural pre-activations below T - quiet_margin (0: the paper's L_D)
    fire_margin: float = 0.0   # L_C asks the certified bound to clear T + fire_margin (0: the paper)
    loose_weight: float = 1.0  # strict only: weight of the added L_LC term (keeps traps sensitive)
    anneal: str = "detection"  # what alpha's growth applies to: "both" losses or only L_D ("detection")
    trap_rule: str = "natural"  # exported thresholds: "fixed" T, or max(T, natural maximum on the training split)
    trap_scale: str = "std"    # "std": the calibrated shift moves each trap by its natural spread (see above)
    scale_floor: float = 0.01  # smallest trap scale (a trap that never varies on the training split)
    eps_ramp_to: float = 0.0   # > 0: the training eps grows linearly from eps (first epoch) to this (last epoch)
    objective: str = "ctt"     # what fine-tuning minimises (harden.train.objectives: ctt, detect-or-robust, robust)
    cert_margin: float = 0.0   # certificate objectives: the hinge asks the margin's lower bound to clear this
    eps_warmup: float | None = None  # share of the step budget over which the training eps grows from 0 to eps
    #                                  (per step; 0: none); None: the objective's default
    batch_size: int = 64
    fpr: float = 0.02          # an epoch qualifies when its calibration trap-FPR is at most this
    max_accuracy_drop: float = 0.01
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        objective = OBJECTIVES.find(self.objective)
        # The objective's defaults first (it knows its loss), then the kind's, then the common ones.
        for table in (objective.defaults if objective else {}, KIND_DEFAULTS.get(self.kind, {}), COMMON_DEFAULTS):
            for name, value in table.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS

    def check(self) -> None:
        if self.kind not in ("loose", "strict"):
            raise HardenError(f"CTT fine-tuning kind must be loose or strict; got {self.kind!r}")
        if self.anneal not in ANNEAL:
            raise HardenError(f"--anneal must be one of {', '.join(ANNEAL)}; got {self.anneal!r}")
        if self.trap_scale not in TRAP_SCALES:
            raise HardenError(f"--trap-scale must be one of {', '.join(TRAP_SCALES)}; got {self.trap_scale!r}")
        if not self.scale_floor > 0:
            raise HardenError(f"scale_floor must be positive; got {self.scale_floor}")
        if self.trap_rule not in TRAP_RULES:
            raise HardenError(f"--trap-rule must be one of {', '.join(TRAP_RULES)}; got {self.trap_rule!r}")
        if self.epochs is not None and self.steps is not None:
            raise HardenError(f"give --epochs or --steps, not both; got epochs {self.epochs}, steps {self.steps}")
        for name in ("steps", "epochs", "check_every", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HardenError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.patience < 0:
            raise HardenError(f"--patience must be >= 0 (0: no early stop); got {self.patience}")
        if not 0.0 <= self.min_improvement < 1.0:
            raise HardenError(f"min_improvement must lie in [0, 1); got {self.min_improvement}")
        for name in ("alpha", "lr", "alpha_growth"):
            if not getattr(self, name) > 0:
                raise HardenError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        if self.alpha_every < 0:
            raise HardenError(f"--alpha-every must be >= 0 (0: never); got {self.alpha_every}")
        OBJECTIVES.get(self.objective)   # an unknown name lists the registered ones
        if not 0.0 <= self.eps_warmup <= 1.0:
            raise HardenError(f"eps_warmup must lie in [0, 1] (a share of the step budget); got {self.eps_warmup}")
        if not self.cert_margin >= 0:
            raise HardenError(f"cert_margin must be >= 0; got {self.cert_margin}")
        if not self.eps >= 0:
            raise HardenError(f"--eps must be >= 0; got {self.eps}")
        if not self.eps_ramp_to >= 0:
            raise HardenError(f"--eps-ramp-to must be >= 0 (0: off); got {self.eps_ramp_to}")


def default_check_every(steps_per_epoch: int) -> int:
    """One calibration check per epoch, clamped to [CHECK_EVERY_MIN, CHECK_EVERY_MAX] steps."""
    return max(CHECK_EVERY_MIN, min(CHECK_EVERY_MAX, steps_per_epoch))


@dataclass
class EpochRecord:
    """One calibration check (the name is historical: with --epochs there is one check per epoch)."""

    epoch: int                 # the check's number, from 1 (with --epochs: the epoch)
    step: int                  # optimisation steps taken when the check ran
    alpha: float
    cross_entropy: float       # training-split means over the batches since the previous check
    l_d: float
    l_c: float                 # as trained (with the fire margin, and L_LC for strict)
    accuracy: float            # on the calibration split
    fpr: float                 # calibration inputs where some trap exceeds its exported threshold (before the shift)
    cal_l_d: float             # the paper's L_D at T, mean on the calibration split
    cal_l_c: float             # the paper's L_LC / L_SC (no margin) at the exported thresholds, calibration mean
    seconds: float             # since the previous check, the check included
    stop: str = ""             # on the last check only: why training stopped (STOP_REASONS)


def _better(candidate: EpochRecord, best: EpochRecord | None, baseline_accuracy: float, cfg: FinetuneConfig) -> bool:
    """The best check, by tiers: (1) calibration FPR <= fpr and accuracy within max_accuracy_drop of the user's
    model: the lowest calibration L_C; (2) accuracy within the drop only: the lowest FPR + L_C; (3) neither:
    the most accurate.  A higher tier always wins; ties keep the earlier check."""

    def tier(r: EpochRecord) -> int:
        accurate = r.accuracy >= baseline_accuracy - cfg.max_accuracy_drop - 1e-12
        return 0 if accurate and r.fpr <= cfg.fpr else 1 if accurate else 2

    if best is None:
        return True
    if tier(candidate) != tier(best):
        return tier(candidate) < tier(best)
    if tier(candidate) == 0:
        return candidate.cal_l_c < best.cal_l_c
    if tier(candidate) == 2:  # nothing accurate enough: never ship the check that broke the classifier most
        return candidate.accuracy > best.accuracy
    return candidate.fpr + candidate.cal_l_c < best.fpr + best.cal_l_c


class _Traps:
    """The graphs and masks the losses need, built once per fine-tuning run."""

    def __init__(self, gm: fx.GraphModule, sites: list[str], masks: dict[str, torch.Tensor], cfg: FinetuneConfig,
                 input_range):
        self.sites = list(sites)
        self.masks = [masks[s] for s in self.sites]
        self.cfg = cfg
        self.gm = gm
        self.eps = cfg.eps          # this step's training eps (``eps_ramp_to`` and ``eps_warmup`` move it)
        self.input_range = input_range
        pre = [pre_activation(gm, s) for s in self.sites]
        self.natural = feature_extractor(gm, pre)          # logits and each site's pre-activation
        self.bounds = bounds_graph(gm, pre)                 # the pre-activations' interval bounds only
        self.pre = pre
        # Training runs the natural and the bounds pass as one stacked pass when every layer allows it; the
        # first batch checks it against the general path (``forward``) before it is trusted.
        self.stacked = stacked_runner(gm, dict(zip(pre, self.masks)))
        self.stacked_checked = False
        self.objective = OBJECTIVES.get(cfg.objective)(self)

    def general(self, x: torch.Tensor, box: Interval):
        """(logits, per site (natural, lower, upper) at the masked positions): natural pass plus ``propagate``."""
        logits, *pre = self.natural(x)
        bounds = propagate(self.bounds, box).output
        gather = [lambda t, m=m: t.flatten(1).index_select(1, m) for m in self.masks]
        return logits, [(g(a), g(b.lo), g(b.hi)) for g, a, b in zip(gather, pre, bounds)]

    def forward(self, x: torch.Tensor):
        """Logits and, per site, the natural pre-activations and their interval bounds over the eps-box around
        ``x``, gathered at the masked positions ([N, count] each)."""
        box = Interval.from_box(x, self.eps, self.input_range)
        # every rank takes the same path (each checked its own shard)
        return checked_once(self, lambda: self.general(x, box), lambda: self.stacked(x, box, self.pre), _close,
                            agree)

    def losses(self, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy, L_D and L_C as trained (batch means), by the configured objective."""
        return self.objective.losses(x, y)

    @torch.no_grad()
    def thresholds(self, x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
        """Per trap neuron, the threshold the exported head will use (``trap_rule``), before calibration."""
        t = self.cfg.threshold
        top = [torch.full((len(m),), t, device=m.device) for m in self.masks]
        if self.cfg.trap_rule == "fixed":
            return top

        def chunk_max(rows: slice) -> list[torch.Tensor]:
            _, *pre = self.natural(x[rows])
            # relu(z) > T  <=>  z > T for T >= 0, so the pre-activation's maximum stands for the activation's
            return [a.flatten(1).index_select(1, m).amax(dim=0).cpu() for a, m in zip(pre, self.masks)]

        for part in map_chunks(len(x), batch, chunk_max):
            top = [torch.maximum(k, p.to(k.device)) for k, p in zip(top, part)]
        return top

    @torch.no_grad()
    def scales(self, x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
        """Per trap neuron, the natural standard deviation of its pre-activation on ``x``, at least scale_floor."""
        def chunk_values(rows: slice) -> list[torch.Tensor]:
            _, *pre = self.natural(x[rows])
            return [a.flatten(1).index_select(1, m).cpu() for a, m in zip(pre, self.masks)]

        parts = list(zip(*map_chunks(len(x), batch, chunk_values)))
        return [torch.cat(p).std(dim=0).clamp_min(self.cfg.scale_floor).to(m.device)
                for p, m in zip(parts, self.masks)]

    def score(self, x: torch.Tensor, y: torch.Tensor, thresholds: list[torch.Tensor],
              batch: int = 500) -> tuple[float, float, float, float, float]:
        """The objective's calibration figures: accuracy, trap FPR (before calibration), the paper's L_D at T, the
        objective's figure at ``thresholds`` (lower is better; the kept-check rule) and the figure convergence
        watches (``harden.train.objectives``)."""
        return self.objective.score(x, y, thresholds, batch)


class _Objective(torch.nn.Module):
    """The training losses as a module whose parameters are the classifier's, for DistributedDataParallel."""

    def __init__(self, gm: fx.GraphModule, traps: _Traps):
        super().__init__()
        self.gm = gm
        self.traps = traps

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.traps.losses(x, y)


def _close(reference, candidate, tol: float = 1e-4) -> bool:
    """The stacked pass agrees with the general one (relative to each tensor's scale)."""
    pairs = [(reference[0], candidate[0])]
    pairs += [(a, b) for ref, got in zip(reference[1], candidate[1]) for a, b in zip(ref, got)]
    with torch.no_grad():
        return all(a.shape == b.shape and float((a - b).abs().max()) <= tol * (1.0 + float(a.abs().max()))
                   for a, b in pairs)


def finetune_ctt(
    gm: fx.GraphModule,
    sites: list[str],
    masks: dict[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor],
    input_range: tuple[float, float],
    cfg: FinetuneConfig,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
    on_epoch: Callable[[EpochRecord, fx.GraphModule], None] | None = None,
) -> tuple[list[EpochRecord], int, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Fine-tune ``gm`` in place; on return it holds the best check's weights.

    Returns (history: one record per check, the last one saying why training stopped; the best check's number,
    0 when no check stayed within ``max_accuracy_drop`` of the original and the original weights were kept;
    per-site trap thresholds by ``cfg.trap_rule`` for the best weights; per-site trap scales by ``cfg.trap_scale``
    or None when unscaled).

    ``on_epoch(record, gm)`` is called after each check (experiments use it to measure attacks per check).
    """
    cfg.check()
    device = torch.device(cfg.device)
    gm.to(device)
    masks = {s: m.to(device) for s, m in masks.items()}
    x_train, y_train = (t.to(device) for t in train)
    x_cal, y_cal = (t.to(device) for t in calibration)
    traps = _Traps(gm, sites, masks, cfg, input_range)
    gm.eval()
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=0.0)
    # Under torchrun every rank walks the same batches; each computes its share, DDP all-reduces the gradients.
    dp = DataParallel(_Objective(gm, traps), device)
    generator = torch.Generator().manual_seed(cfg.seed)

    thresholds = traps.thresholds(x_train)
    traps.objective.refresh(thresholds)
    baseline_accuracy, _, _, _, reference = traps.score(x_cal, y_cal, thresholds)
    history: list[EpochRecord] = []
    original_state = copy.deepcopy(gm.state_dict())
    best, best_state = None, original_state
    alpha = cfg.alpha
    batches = math.ceil(len(x_train) / cfg.batch_size)
    if cfg.epochs is not None:   # the explicit override: whole epochs, a check at each end, no early stop
        total, every, patience = cfg.epochs * batches, batches, 0
    else:
        total, every, patience = cfg.steps, cfg.check_every or default_check_every(batches), cfg.patience
    planned_epochs = math.ceil(total / batches)
    label = f"ctt-{cfg.kind}" + ("" if cfg.objective == "ctt" else f" ({cfg.objective})")
    warmup = round(cfg.eps_warmup * total)
    watch_from = traps.objective.watch_from(total)
    stale, stop = 0, "epochs" if cfg.epochs is not None else "step budget"
    sums, count, started = torch.zeros(3), 0, time.perf_counter()
    for step in range(total):
        epoch, b = divmod(step, batches)
        if b == 0:   # an epoch starts: a fresh order, the annealed alpha, the ramped eps
            if epoch and cfg.alpha_every and epoch % cfg.alpha_every == 0:
                alpha *= cfg.alpha_growth
            w_d, w_c = (alpha * cfg.detection_weight, alpha) if cfg.anneal == "both" else \
                (alpha * cfg.detection_weight, cfg.alpha)
            if cfg.eps_ramp_to > 0:
                traps.eps = cfg.eps + (cfg.eps_ramp_to - cfg.eps) * epoch / max(1, planned_epochs - 1)
            order = torch.randperm(len(x_train), generator=generator).to(device)
        if warmup:   # the training eps grows from 0 to eps over the first steps (IBP training's ramp)
            traps.eps = cfg.eps * min(1.0, (step + 1) / warmup)
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        rows, weight = dp.shard(idx)
        ce, l_d, l_c = dp.module(x_train[rows], y_train[rows])
        loss = (ce + w_d * l_d + w_c * l_c) * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([ce.detach(), l_d.detach(), l_c.detach()]).cpu() * dp.share(idx)
        count += 1
        progress(f"{label} step {step + 1}/{total}", (step + 1) / total)
        if (step + 1) % every and step + 1 < total:
            continue
        thresholds = traps.thresholds(x_train)
        accuracy, fpr, cal_l_d, cal_l_c, cal_l_c_at_t = traps.score(x_cal, y_cal, thresholds)
        traps.objective.refresh(thresholds)
        ce_m, l_d_m, l_c_m = (float(v) / count for v in dp.sum(sums))
        record = EpochRecord(len(history) + 1, step + 1, alpha, ce_m, l_d_m, l_c_m, accuracy, fpr, cal_l_d, cal_l_c,
                             time.perf_counter() - started)
        history.append(record)
        sums, count, started = torch.zeros(3), 0, time.perf_counter()
        progress(f"{label} step {step + 1}/{total}: CE {ce_m:.3f} L_D {l_d_m:.3g} L_C {l_c_m:.3g} "
                 f"| calibration acc {accuracy:.3f} FPR {fpr:.3f} L_C {cal_l_c:.3g}", (step + 1) / total)
        if on_epoch is not None:
            on_epoch(record, gm)
        if _better(record, best, baseline_accuracy, cfg):
            best, best_state = record, copy.deepcopy(gm.state_dict())
        # Convergence: the calibration L_C at T (the loss training lowers) has not improved on its best so far
        # (the untrained model's to begin with) by a relative min_improvement for `patience` checks in a row.
        # Not the L_C at the exported thresholds: with trap_rule "natural" those rise with the traps' natural
        # values, so that loss stays flat while the traps still learn, and training stopped after ~3 checks.
        # Checks before ``watch_from`` (an eps schedule still moving) do not count towards it.
        if cal_l_c_at_t < reference * (1.0 - cfg.min_improvement):
            reference, stale = cal_l_c_at_t, 0
        elif step + 1 > watch_from:
            stale += 1
        if patience and stale >= patience:
            stop = "converged"
            break
    history[-1].stop = stop
    if best is not None and best.accuracy < baseline_accuracy - cfg.max_accuracy_drop - 1e-12:
        # No check kept the classifier within the accuracy drop: ship the user's model unchanged (its traps then
        # work as ctt-lite's, at their natural thresholds) rather than a fine-tuned one that lost accuracy.
        best, best_state = None, original_state
    gm.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    thresholds = {s: t.cpu() for s, t in zip(traps.sites, traps.thresholds(x_train))}
    scales = ({s: k.cpu() for s, k in zip(traps.sites, traps.scales(x_train))} if cfg.trap_scale == "std" else None)
    gm.to("cpu")
    return history, best.epoch if best else 0, thresholds, scales


def history_json(history: list[EpochRecord]) -> list[dict]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in history]
