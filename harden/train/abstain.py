"""Joint fine-tuning of a classifier and its abstain score for the abstain certificate (``--method abstain``;
Sheikholeslami, Lotfi and Kolter, ICLR 2021; the rows in :mod:`harden.bounds.abstain`).

Per batch, with h the logits layer's input and the box B = [x - eps, x + eps] clipped to the input range:

- **natural**: cross-entropy of the K + 1 logits (the classifier's and the abstain score) with the label: on
  natural inputs the label wins, the abstain score too must stay below it;
- **certificate**, by ``loss``:
  - ``hinge``: relu(kappa - min_{j != y} max(lower(z_y - z_j), lower(z_abs - z_j))) over B, zero exactly where the
    certificate holds with kappa = 0;
  - ``ce`` (the paper's): ``robust_weight`` x the K-class robust cross-entropy (worst-case logits -lower(z_y - z_j))
    + ``detection_weight`` x the detection cross-entropy (the abstain class is the answer for the whole box over
    the wrong classes: worst-case logits -lower(z_abs - z_j), j != y).

Bounds: interval (``ibp``: one stacked natural + bounds pass, :mod:`harden.train.stacked_bounds`) or ``crown-ibp``
(interval intermediate bounds, the rows by a backward linear relaxation; the larger of the two is used). The
training eps grows from 0 to eps over the first ``eps_warmup`` share of the steps.  Every ``check_every`` steps the
calibration split is scored: accuracy, the alarm threshold t calibrated for the target FPR as ``harden
instrument`` will set it, and the share of calibration inputs certified detect-or-robust at the full eps with
offset -t.  The kept check: the most certified among those within ``max_accuracy_drop`` of the original's
calibration accuracy, else the most accurate (the original weights if none stays within the drop).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.bounds.abstain import (abstain_hinge, abstain_rows, certificate_of, crown_rows_lower, detection_ce,
                                   interval_rows_lower, robust_ce)
from harden.bounds.interval import Interval
from harden.bounds.margin import final_linear
from harden.bounds.propagate import propagate
from harden.errors import HardenError
from harden.graph.analyse import feature_extractor
from harden.train.graphs import bounds_graph
from harden.train.stacked_bounds import checked_once, stacked_runner

LOSSES = ("hinge", "ce")
TRAIN_BOUNDS = ("ibp", "crown-ibp")


@dataclass
class AbstainConfig:
    eps: float
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 64
    eps_warmup: float = 0.5
    loss: str = "ce"
    cert_weight: float = 1.0
    robust_weight: float = 1.0
    detection_weight: float = 1.0
    natural_weight: float = 1.0
    kappa: float = 0.0
    bounds: str = "ibp"
    check_every: int = 50
    fpr: float = 0.02
    fpr_confidence: float = 0.9
    max_accuracy_drop: float = 0.01
    seed: int = 0
    device: str = "cpu"


def _close(reference, candidate, tol: float = 1e-4) -> bool:
    """(logits, h, Interval) of the stacked pass against the general one, relative to each tensor's scale."""
    pairs = ((reference[0], candidate[0]), (reference[1], candidate[1]), (reference[2].lo, candidate[2].lo),
             (reference[2].hi, candidate[2].hi))
    return all(float((a - b).detach().abs().max()) <= tol * (1.0 + float(a.detach().abs().max())) for a, b in pairs)


@dataclass
class LogitsLinear:
    """The logits layer's weight [K, F] and bias [K] (or None): the graph's own tensors, trained in place."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


def _attribute(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise ValueError("not a stored tensor")
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def logits_layer(gm: fx.GraphModule) -> tuple[fx.Node, LogitsLinear, str]:
    """The classifier's logits layer (a linear layer fed by one node: an nn.Linear, or a linear call on the graph's
    stored weight and bias as a .pt2 program has it) and the name of its input node h."""
    fold = final_linear(gm)
    refusal = HardenError("the abstain method needs the classifier's logits to come from an nn.Linear layer "
                          "(its abstain score is one more row on that layer's input)")
    if fold is None:
        raise refusal
    if fold.op == "call_module" and isinstance(gm.get_submodule(fold.target), nn.Linear):
        module = gm.get_submodule(fold.target)
        layer, h = LogitsLinear(module.weight, module.bias), fold.args[0]
    elif fold.op == "call_function":
        args = list(fold.args) + [None] * (3 - len(fold.args))
        h = args[0]
        try:
            weight = _attribute(gm, fold.kwargs.get("weight", args[1]))
            bias = _attribute(gm, fold.kwargs.get("bias", args[2]))
        except (ValueError, AttributeError):
            raise refusal from None
        if weight is None or weight.dim() != 2:
            raise refusal
        layer = LogitsLinear(weight, bias)
    else:
        raise refusal
    if not isinstance(h, fx.Node):
        raise refusal
    return fold, layer, h.name


class AbstainHead(nn.Module):
    """raw = z_abs - max_k z_k, z_abs = w_a . h + b_a on the logits layer's input h: the alarm (raw > t) is the
    abstain score, offset by -t, beating every class logit."""

    def __init__(self, features: int):
        super().__init__()
        self.abstain = nn.Linear(features, 1)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return self.abstain(h.flatten(1)).squeeze(1)

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.score(h) - logits.amax(dim=1)


class AbstainBounds:
    """``__call__(x, y, eps, offset)`` -> (logits, h, lower [N, 2K]): the natural logits and penultimate values,
    and lower bounds of the margin and abstain rows over the eps-box (:func:`harden.bounds.abstain.abstain_rows`)."""

    def __init__(self, gm: fx.GraphModule, head: AbstainHead, input_range, bounds: str = "ibp"):
        self.gm, self.head, self.input_range, self.method = gm, head, input_range, bounds
        self.fold, self.linear, self.through = logits_layer(gm)
        self.natural = feature_extractor(gm, [self.through])
        self.bounds = bounds_graph(gm, [self.through])
        self.stacked = stacked_runner(gm, {}, through=self.through)
        self.stacked_checked = False
        self.engine = None
        if bounds == "crown-ibp":
            from harden.bounds.crown import LinearBounds

            self.engine = LinearBounds(gm)

    def _general(self, x, box):
        logits, h = self.natural(x)
        (last,) = propagate(self.bounds, box).output
        return logits, h, last

    def _pass(self, x, box):
        return checked_once(self, lambda: self._general(x, box), lambda: self._stacked(x, box), _close)

    def _stacked(self, x, box):
        logits, _, (h, lo, hi) = self.stacked(x, box, [], None)
        return logits, h, Interval(lo, hi)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float, offset: float = 0.0):
        box = Interval.from_box(x, eps, self.input_range)
        logits, h, last = self._pass(x, box)
        A, c = abstain_rows(self.linear.weight, self.linear.bias, self.head.abstain.weight.reshape(-1),
                            self.head.abstain.bias.reshape(()), y, offset)
        flat = Interval(last.lo.flatten(1), last.hi.flatten(1))
        lower = interval_rows_lower(flat, A, c)
        if self.engine is not None:
            values = self.engine.bound_graph(box, "crown-ibp").nodes
            lower = torch.maximum(lower, crown_rows_lower(self.engine, values, self.fold, A, c))
        return logits, h.flatten(1), lower


@dataclass
class CheckRecord:
    step: int
    eps: float
    natural: float           # training means since the previous check
    certificate: float
    accuracy: float          # calibration split
    threshold: float         # the calibrated t
    fpr: float               # calibration alarms at t
    robust: float            # calibration shares certified at the full eps (interval / the training bound)
    detect_or_robust: float
    seconds: float


def _threshold(raw: np.ndarray, fpr: float, confidence: float) -> float:
    from harden.detectors.calibration import calibrate

    return float(calibrate(raw.reshape(-1, 1).astype(np.float32), 1, fpr, confidence).thresholds[0])


def finetune_abstain(gm: fx.GraphModule, head: AbstainHead, train, calibration, input_range, cfg: AbstainConfig,
                     progress: Callable[[str, float], None] = lambda m, f: None) -> tuple[list[CheckRecord], int]:
    """Fine-tune ``gm`` and ``head`` in place; on return they hold the kept check's weights.  Returns the history
    and the kept check's number (0: no check kept the accuracy and the original weights are back)."""
    if cfg.loss not in LOSSES:
        raise HardenError(f"abstain loss must be one of {', '.join(LOSSES)}; got {cfg.loss!r}")
    if cfg.bounds not in TRAIN_BOUNDS:
        raise HardenError(f"abstain bounds must be one of {', '.join(TRAIN_BOUNDS)}; got {cfg.bounds!r}")
    device = torch.device(cfg.device)
    gm.to(device), head.to(device)
    x_train, y_train = (t.to(device) for t in train)
    x_cal, y_cal = (t.to(device) for t in calibration)
    bounds = AbstainBounds(gm, head, input_range, cfg.bounds)
    gm.eval(), head.eval()
    params = [p for p in list(gm.parameters()) + list(head.parameters()) if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def score(batch: int = 500) -> tuple[float, float, float, float, float]:
        logits_all, raw_all = [], []
        for start in range(0, len(x_cal), batch):
            logits, h = bounds.natural(x_cal[start:start + batch])
            logits_all.append(logits)
            raw_all.append(head(h, logits))
        logits, raw = torch.cat(logits_all), torch.cat(raw_all)
        accuracy = float((logits.argmax(1) == y_cal).float().mean())
        t = _threshold(raw.cpu().numpy(), cfg.fpr, cfg.fpr_confidence)
        fpr = float((raw > t).float().mean())
        robust = detect = 0
        for start in range(0, len(x_cal), batch):
            xb, yb = x_cal[start:start + batch], y_cal[start:start + batch]
            cert = certificate_of(bounds(xb, yb, cfg.eps, -t)[2], yb)
            robust += int(cert.robust.sum())
            detect += int((cert.robust | cert.detect_or_robust).sum())
        return accuracy, t, fpr, robust / len(x_cal), detect / len(x_cal)

    baseline_accuracy = score()[0]
    original = (copy.deepcopy(gm.state_dict()), copy.deepcopy(head.state_dict()))
    kept, kept_state, kept_key = 0, original, None
    history: list[CheckRecord] = []
    batches = math.ceil(len(x_train) / cfg.batch_size)
    warmup = round(cfg.eps_warmup * cfg.steps)
    sums, count, started = [0.0, 0.0], 0, time.perf_counter()
    eps = cfg.eps
    for step in range(cfg.steps):
        epoch, b = divmod(step, batches)
        if b == 0:
            order = torch.randperm(len(x_train), generator=generator).to(device)
        eps = cfg.eps * min(1.0, (step + 1) / warmup) if warmup else cfg.eps
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        xb, yb = x_train[idx], y_train[idx]
        logits, h, lower = bounds(xb, yb, eps)
        natural = F.cross_entropy(torch.cat([logits, head.score(h).unsqueeze(1)], 1), yb)
        if cfg.loss == "hinge":
            cert = cfg.cert_weight * abstain_hinge(lower, yb, cfg.kappa).mean()
        else:
            cert = (cfg.robust_weight * robust_ce(lower, yb) + cfg.detection_weight * detection_ce(lower, yb)).mean()
        loss = cfg.natural_weight * natural + cert
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += float(natural.detach())
        sums[1] += float(cert.detach())
        count += 1
        progress(f"abstain step {step + 1}/{cfg.steps}", (step + 1) / cfg.steps)
        if (step + 1) % cfg.check_every and step + 1 < cfg.steps:
            continue
        accuracy, t, fpr, robust, detect = score()
        record = CheckRecord(step + 1, eps, sums[0] / count, sums[1] / count, accuracy, t, fpr, robust, detect,
                             time.perf_counter() - started)
        history.append(record)
        sums, count, started = [0.0, 0.0], 0, time.perf_counter()
        progress(f"abstain step {step + 1}/{cfg.steps}: natural {record.natural:.3f} certificate "
                 f"{record.certificate:.3g} | calibration acc {accuracy:.3f} FPR {fpr:.3f} robust {robust:.3f} "
                 f"detect-or-robust {detect:.3f}", (step + 1) / cfg.steps)
        accurate = accuracy >= baseline_accuracy - cfg.max_accuracy_drop - 1e-12
        key = (1 if accurate else 0, detect if accurate else accuracy)
        if kept_key is None or key > kept_key:
            kept, kept_key = len(history), key
            kept_state = (copy.deepcopy(gm.state_dict()), copy.deepcopy(head.state_dict()))
    if kept_key is not None and kept_key[0] == 0:
        kept, kept_state = 0, original   # nothing stayed accurate: the user's weights back
    gm.load_state_dict(kept_state[0])
    head.load_state_dict(kept_state[1])
    for p in params:
        p.requires_grad_(False)
    gm.to("cpu"), head.to("cpu")
    return history, kept


def history_json(history: list[CheckRecord]) -> list[dict]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in history]
