"""CTT fine-tuning (paper 000, Algorithm 1): cross-entropy + alpha * (L_D + L_C), alpha annealed upward.

The classifier is trained in eval mode (batch-norm statistics and dropout
frozen) because the interval rules use eval-mode semantics and the
architecture must not change.  Each epoch is scored on the calibration split
and the best epoch is kept by one documented rule (see ``_better``).
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
from harden.graph.analyse import feature_extractor
from harden.train.ctt_losses import certification_loss, detection_loss


@dataclass
class FinetuneConfig:
    kind: str                  # "loose" | "strict"
    threshold: float = 1e-4
    eps: float = 3e-3
    epochs: int = 30
    alpha: float = 0.05
    alpha_growth: float = 1.5
    alpha_every: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    fpr: float = 0.02          # an epoch qualifies when its calibration trap-FPR is at most this
    max_accuracy_drop: float = 0.01
    seed: int = 0
    device: str = "cpu"


@dataclass
class EpochRecord:
    epoch: int
    alpha: float
    cross_entropy: float
    l_d: float
    l_c: float
    accuracy: float            # on the calibration split
    fpr: float                 # fraction of calibration inputs where some trap exceeds T
    cal_l_c: float             # mean L_C on the calibration split
    seconds: float


def _better(candidate: EpochRecord, best: EpochRecord | None, baseline_accuracy: float, cfg: FinetuneConfig) -> bool:
    """The best epoch: among those with calibration FPR <= fpr and accuracy within max_accuracy_drop of the
    user's model, the lowest calibration L_C; if no epoch qualifies yet, the lowest FPR + L_C."""

    def qualifies(r: EpochRecord) -> bool:
        return r.fpr <= cfg.fpr and r.accuracy >= baseline_accuracy - cfg.max_accuracy_drop

    if best is None:
        return True
    if qualifies(candidate) != qualifies(best):
        return qualifies(candidate)
    if qualifies(candidate):
        return candidate.cal_l_c < best.cal_l_c
    return candidate.fpr + candidate.cal_l_c < best.fpr + best.cal_l_c


def pre_activation(gm: fx.GraphModule, site: str) -> str:
    """The node a site's ReLU reads: its bounds carry gradient where the ReLU's own lower bound is flat at 0."""
    node = next(n for n in gm.graph.nodes if n.name == site)
    return node.all_input_nodes[0].name


def _losses(gm, extractor, sites, masks, x, y, cfg, input_range):
    logits, *acts = extractor(x)
    ce = F.cross_entropy(logits, y)
    box = Interval.from_box(x, cfg.eps, input_range)
    # L_C on the ReLU's input bounds: [relu(b) >= T] == [b >= T] for T > 0, so the loss is zero exactly
    # where the paper's is, but relu(T - b) keeps a gradient when b < 0 (relu(T - relu(b)) has none there).
    inputs = {s: pre_activation(gm, s) for s in sites}
    bounds = propagate(gm, box, record=set(inputs.values()))
    l_d = sum(detection_loss(a, masks[s], cfg.threshold) for s, a in zip(sites, acts))
    l_c = sum(certification_loss(bounds[inputs[s]], masks[s], cfg.threshold, cfg.kind) for s in sites)
    return logits, ce, l_d.mean(), l_c.mean(), acts


@torch.no_grad()
def _score(gm, extractor, sites, masks, x, y, cfg, input_range) -> tuple[float, float, float]:
    correct, alarms, l_c_sum = 0, 0, 0.0
    for start in range(0, len(x), 256):
        xb, yb = x[start : start + 256], y[start : start + 256]
        logits, *acts = extractor(xb)
        correct += int((logits.argmax(1) == yb).sum())
        fired = torch.zeros(len(xb), dtype=torch.bool, device=xb.device)
        for s, a in zip(sites, acts):
            fired |= (a.flatten(1).index_select(1, masks[s]) > cfg.threshold).any(dim=1)
        alarms += int(fired.sum())
        inputs = {s: pre_activation(gm, s) for s in sites}
        bounds = propagate(gm, Interval.from_box(xb, cfg.eps, input_range), record=set(inputs.values()))
        l_c_sum += float(sum(certification_loss(bounds[inputs[s]], masks[s], cfg.threshold, cfg.kind)
                             for s in sites).sum())
    return correct / len(x), alarms / len(x), l_c_sum / len(x)


def finetune_ctt(
    gm: fx.GraphModule,
    sites: list[str],
    masks: dict[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor],
    input_range: tuple[float, float],
    cfg: FinetuneConfig,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
) -> tuple[list[EpochRecord], int]:
    """Fine-tune ``gm`` in place; on return it holds the best epoch's weights. Returns (history, best epoch)."""
    device = torch.device(cfg.device)
    gm.to(device)
    masks = {s: m.to(device) for s, m in masks.items()}
    x_train, y_train = (t.to(device) for t in train)
    x_cal, y_cal = (t.to(device) for t in calibration)
    extractor = feature_extractor(gm, sites)
    gm.eval()
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)

    baseline_accuracy, _, _ = _score(gm, extractor, sites, masks, x_cal, y_cal, cfg, input_range)
    history: list[EpochRecord] = []
    best, best_state = None, copy.deepcopy(gm.state_dict())
    alpha = cfg.alpha
    for epoch in range(cfg.epochs):
        if epoch and cfg.alpha_every and epoch % cfg.alpha_every == 0:
            alpha *= cfg.alpha_growth
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        sums = {"ce": 0.0, "l_d": 0.0, "l_c": 0.0}
        batches = math.ceil(len(x_train) / cfg.batch_size)
        for b in range(batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            _, ce, l_d, l_c, _ = _losses(gm, extractor, sites, masks, x_train[idx], y_train[idx], cfg, input_range)
            loss = ce + alpha * (l_d + l_c)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["ce"] += float(ce.detach())
            sums["l_d"] += float(l_d.detach())
            sums["l_c"] += float(l_c.detach())
            progress(f"{cfg.kind} epoch {epoch + 1}/{cfg.epochs}", (epoch + (b + 1) / batches) / cfg.epochs)
        accuracy, fpr, cal_l_c = _score(gm, extractor, sites, masks, x_cal, y_cal, cfg, input_range)
        record = EpochRecord(epoch + 1, alpha, sums["ce"] / batches, sums["l_d"] / batches, sums["l_c"] / batches,
                             accuracy, fpr, cal_l_c, time.perf_counter() - started)
        history.append(record)
        progress(f"{cfg.kind} epoch {record.epoch}: CE {record.cross_entropy:.3f} L_D {record.l_d:.3g} "
                 f"L_C {record.l_c:.3g} acc {accuracy:.3f} FPR {fpr:.3f}", (epoch + 1) / cfg.epochs)
        if _better(record, best, baseline_accuracy, cfg):
            best, best_state = record, copy.deepcopy(gm.state_dict())
    gm.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    gm.to("cpu")
    return history, best.epoch if best else 0


def history_json(history: list[EpochRecord]) -> list[dict]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in history]
