"""Certified fine-tuning against flow fields (thesis 001, section 4.2): the flow certificate in the loss.

``harden instrument --finetune flow:delta=D[,...]`` fine-tunes the classifier before any method is fitted:

    loss = (1 - kappa) * CE(logits(x), y) + kappa * CE(worst(x), y)

where ``worst(x)`` holds, per class j != y, an upper bound of logit_j - logit_y over every image ``warp(x, r)``
with each flow component in [-delta, delta] (and 0 for y): interval bounds from the exact flow box
(:mod:`harden.bounds.flow_box`), the label margin folded into a last linear layer as ``harden certify``
folds it.  As in interval-bound training (Gowal et al. 2018), delta and kappa ramp up from 0 over the
first ``ramp`` fraction of the steps, then stay.  The thesis trains the SDP certificate of a two-layer
network with the network (Raghunathan et al.'s dual); its matrix depends on each image's pixel ranges here,
so one eigenvalue problem per image and class pair per step, which is why the bound in the loss is the one
``harden certify --bounds ibp`` computes, and works for every network harden can bound.

It is a fine-tuning *objective*, not a method: it changes the classifier's weights and adds no detector, no
score and no alarm, so it composes with any detection method (which is then fitted on the fine-tuned
classifier); the bundle keeps the original weights, and ``harden certify --threat flow:...`` reports both.
The model is scored on the calibration split every ``check_every`` steps (clean accuracy, and the fraction
certified by interval bounds at the full delta); the check with the most inputs certified *and* correct is
kept (ties: the more accurate).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.flow_box import flow_box
from harden.bounds.interval import Interval
from harden.bounds.linear import linear_parts
from harden.bounds.propagate import input_dependent, propagate
from harden.bounds.rules import Call
from harden.core.options import OptionSet, format_value, option, split_spec
from harden.core.registry import Registry
from harden.errors import HardenError
from harden.graph.ops import canonical_op
from harden.graph.trace import output_node
from harden.io.data import Dataset
from harden.train.parallel import DataParallel


@dataclass
class FlowObjective(OptionSet):
    """``--finetune flow:key=value,...``: every option with its type, default, range and meaning."""

    delta: float | None = option(None, "per-pixel flow bound trained against, in pixels: required, the user's threat",
                                 minimum=0.0, strict=True)
    kappa: float = option(0.5, "weight of the certified loss once ramped up (0: plain training, 1: only certified)",
                          minimum=0.0, maximum=1.0)
    steps: int = option(1500, "optimisation steps", minimum=1)
    ramp: float = option(0.5, "fraction of the steps over which delta and kappa grow from 0", minimum=0.0,
                         maximum=1.0)
    lr: float = option(5e-4, "Adam's learning rate", minimum=0.0, strict=True)
    batch_size: int = option(64, "training batch", minimum=1)
    check_every: int = option(100, "steps between calibration checks", minimum=1)
    seed: int = option(0, "seed of the batch order", minimum=0)

    def check(self, owner: str = "--finetune flow") -> None:
        if self.delta is None:
            raise HardenError(f"{owner} needs delta=D: the per-pixel flow bound (pixels) to certify against")

    def text(self) -> str:
        """``flow:key=value,...`` with every option: what a recipe records (parses back to these options)."""
        return "flow:" + ",".join(f"{k}={format_value(v)}" for k, v in self.to_dict().items())


OBJECTIVES: Registry[type] = Registry("fine-tuning objective")
OBJECTIVES.register("flow")(FlowObjective)


def parse_objective(text: str) -> FlowObjective:
    """``flow:delta=0.5,steps=800`` -> the objective's settings, typed and checked."""
    name, given = split_spec(text, "--finetune objective")
    cls = OBJECTIVES.get(name)
    return cls.parse(f"--finetune {name}", given)


# ---------------------------------------------------------------------------------------------- the bound
def _fold_node(gm: fx.GraphModule) -> fx.Node | None:
    last = output_node(gm).args[0]
    if isinstance(last, fx.Node) and canonical_op(gm, last) == "linear" and last in input_dependent(gm):
        return last
    return None


def worst_logits(gm: fx.GraphModule, box: Interval, y: torch.Tensor, fold: fx.Node | None) -> torch.Tensor:
    """[N, K]: an upper bound of logit_j - logit_y over the box for j != y, and 0 at y (differentiable)."""
    if fold is not None:
        result = propagate(gm, box, record={n.name for n in fold.all_input_nodes})
        args = fx.map_arg(fold.args, lambda n: result.nodes[n.name])
        kwargs = fx.map_arg(fold.kwargs, lambda n: result.nodes[n.name])
        module = gm.get_submodule(fold.target) if fold.op == "call_module" else None
        x, weight, bias = linear_parts(Call(gm, fold, "linear", tuple(args), dict(kwargs), module))
        if x.dim() == 2:
            diff = weight.unsqueeze(0) - weight[y].unsqueeze(1)            # [N, K, d]: W_j - W_y
            upper = torch.einsum("nkd,nd->nk", diff, x.centre) + torch.einsum("nkd,nd->nk", diff.abs(), x.radius)
            if bias is not None:
                upper = upper + (bias.unsqueeze(0) - bias[y].unsqueeze(1))
            return upper
    logits = propagate(gm, box).output
    upper = logits.hi - logits.lo.gather(1, y.unsqueeze(1))
    return upper.scatter(1, y.unsqueeze(1), 0.0)


# ---------------------------------------------------------------------------------------------- training
class _FlowLoss(torch.nn.Module):
    """The fine-tuning loss as a module whose parameters are the classifier's, for DistributedDataParallel."""

    def __init__(self, gm: fx.GraphModule, fold: fx.Node | None):
        super().__init__()
        self.gm = gm
        self.fold = fold

    def forward(self, x: torch.Tensor, y: torch.Tensor, delta: float, kappa: float) -> torch.Tensor:
        loss = (1 - kappa) * F.cross_entropy(self.gm(x), y)
        if kappa > 0:
            loss = loss + kappa * F.cross_entropy(worst_logits(self.gm, flow_box(x, delta), y, self.fold), y)
        return loss


@dataclass
class FlowCheck:
    step: int
    delta: float
    kappa: float
    loss: float | None         # the training batch's loss at this step (None before training)
    accuracy: float            # calibration split, clean
    certified: float           # calibration split: certified robust (interval bounds) at the full delta
    certified_correct: float   # certified and correctly classified
    seconds: float


def score(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, delta: float, batch: int = 250) -> tuple[float, float, float]:
    """(clean accuracy, certified fraction, certified-and-correct fraction) by interval bounds at ``delta``."""
    fold = _fold_node(gm)
    correct = certified = both = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            right = gm(xb).argmax(1) == yb
            worst = worst_logits(gm, flow_box(xb, delta), yb, fold)
            safe = worst.scatter(1, yb.unsqueeze(1), float("-inf")).amax(1) < 0
            correct += int(right.sum())
            certified += int(safe.sum())
            both += int((safe & right).sum())
    n = max(1, len(x))
    return correct / n, certified / n, both / n


def finetune_flow(gm: fx.GraphModule, data: Dataset, objective: FlowObjective,
                  progress: Callable[[str, float], None] = lambda m, f: None) -> dict:
    """Fine-tune ``gm`` in place (eval mode: batch-norm statistics and dropout frozen); the kept check's weights
    stay in it.  Returns the facts for the manifest: the settings, every check and the kept one."""
    objective.check()
    generator = torch.Generator().manual_seed(objective.seed)
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params:
        raise HardenError("--finetune flow: the classifier has no trainable parameters")
    optimiser = torch.optim.Adam(params, lr=objective.lr)
    fold = _fold_node(gm)
    # Under torchrun every rank walks the same batches, computes the loss on its share, and DDP all-reduces the
    # gradients; the calibration checks are computed whole on every rank (the same figures, the same kept step).
    dp = DataParallel(_FlowLoss(gm, fold))
    x, y = data.train.x, data.train.y
    cal_x, cal_y = data.calibration.x, data.calibration.y
    gm.eval()
    started = time.perf_counter()
    accuracy, certified, both = score(gm, cal_x, cal_y, objective.delta)
    history = [FlowCheck(0, 0.0, 0.0, None, accuracy, certified, both, 0.0)]
    best, best_state = history[0], copy.deepcopy(gm.state_dict())
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    ramp_steps = max(1, int(objective.ramp * objective.steps))
    for step in range(1, objective.steps + 1):
        if cursor + objective.batch_size > len(order):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor:cursor + objective.batch_size]
        cursor += objective.batch_size
        grow = min(1.0, step / ramp_steps)
        delta, kappa = objective.delta * grow, objective.kappa * grow
        rows, weight = dp.shard(idx)
        loss = dp.module(x[rows], y[rows], delta, kappa) * weight
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % objective.check_every == 0 or step == objective.steps:
            loss = dp.sum(loss.detach()) / dp.world.size   # the whole batch's loss, as one process has it
            accuracy, certified, both = score(gm, cal_x, cal_y, objective.delta)
            record = FlowCheck(step, delta, kappa, float(loss.detach()), accuracy, certified, both,
                               round(time.perf_counter() - started, 1))
            history.append(record)
            if (record.certified_correct, record.accuracy) > (best.certified_correct, best.accuracy):
                best, best_state = record, copy.deepcopy(gm.state_dict())
            progress(f"flow fine-tuning: step {step}, cal acc {accuracy:.3f}, certified {certified:.3f}",
                     step / objective.steps)
    gm.load_state_dict(best_state)
    settings = objective.to_dict()
    return {"objective": "flow", "settings": settings, "history": [asdict(r) for r in history],
            "kept_step": best.step, "seconds": round(time.perf_counter() - started, 1)}
