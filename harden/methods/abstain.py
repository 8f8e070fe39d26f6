"""The abstain-class detector (Sheikholeslami, Lotfi and Kolter, ICLR 2021, "Provably robust classification of
adversarial examples with detection").

An abstain score z_abs = w_a . h + b_a is added on the input h of the classifier's last linear layer (one more
output row of that layer, kept in the head so the classifier's logits keep their shape) and fine-tuned jointly
with the classifier so that over every eps-box each wrong class is beaten either by the label or by the abstain
score (:mod:`harden.train.abstain`).  The head's raw score is z_abs - max_k z_k; the calibrated threshold t makes
the alarm "z_abs - t > every class logit".  ``harden certify`` proves, per input, detect-or-robust with this alarm
(:mod:`harden.bounds.abstain`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from harden.core.options import OptionSet, option
from harden.methods.base import LOGITS, FitContext, FittedMethod, Method, key_seed, register_method
from harden.train.abstain import LOSSES, TRAIN_BOUNDS, AbstainConfig, AbstainHead, finetune_abstain, history_json, \
    logits_layer

NAME = "abstain"
_D = {f.name: f.default for f in dataclasses.fields(AbstainConfig)}


@dataclass(frozen=True)
class AbstainOptions(OptionSet):
    eps: float = option(0.02, "L-inf radius of the box the certificate is trained for (input units)",
                        minimum=0.0, strict=True)
    steps: int = option(_D["steps"], "optimisation steps", minimum=1)
    lr: float = option(_D["lr"], "learning rate (RMSProp, no weight decay)", minimum=0.0, strict=True)
    batch_size: int = option(_D["batch_size"], "training batch size", minimum=1)
    eps_warmup: float = option(_D["eps_warmup"], "share of the steps over which the training eps grows from 0 to "
                                                 "eps", minimum=0.0, maximum=1.0)
    loss: str = option(_D["loss"], "the certificate term: hinge (relu(kappa - min_j max(margin_j, abstain_j)), zero "
                                   "exactly where the certificate holds) | ce (the paper's: robust_weight x the "
                                   "K-class robust cross-entropy + detection_weight x the detection cross-entropy)",
                       choices=LOSSES)
    cert_weight: float = option(_D["cert_weight"], "hinge: its weight", minimum=0.0)
    robust_weight: float = option(_D["robust_weight"], "ce: weight of the robust cross-entropy", minimum=0.0)
    detection_weight: float = option(_D["detection_weight"], "ce: weight of the detection cross-entropy",
                                     minimum=0.0)
    natural_weight: float = option(_D["natural_weight"], "weight of the natural cross-entropy over the K + 1 "
                                                         "logits", minimum=0.0)
    kappa: float = option(_D["kappa"], "hinge: the certified bound must clear this", minimum=0.0)
    bounds: str = option(_D["bounds"], "bounds in training: ibp | crown-ibp", choices=TRAIN_BOUNDS)
    check_every: int = option(_D["check_every"], "steps between calibration checks", minimum=1)
    max_accuracy_drop: float = option(_D["max_accuracy_drop"], "a check is kept only within this calibration "
                                                               "accuracy of the original", minimum=0.0, maximum=1.0)


@register_method
class Abstain(Method):
    """A (K+1)-th score on the last linear layer's input, trained with the classifier to cover the eps-box."""

    name = NAME
    finetunes = True
    option_set = AbstainOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        s, o = ctx.settings, ctx.options
        _, linear, through = logits_layer(ctx.gm)
        torch.manual_seed(key_seed(o.key, f"abstain:{o.seed}") % (2 ** 31))
        head = AbstainHead(linear.in_features)
        with torch.no_grad():   # start below every class: the mean class row, a margin under the mean bias
            head.abstain.weight.copy_(linear.weight.mean(0, keepdim=True))
            head.abstain.bias.fill_(float(linear.bias.mean()) - 1.0 if linear.bias is not None else -1.0)
        cfg = AbstainConfig(eps=float(s.eps), steps=s.steps, lr=s.lr, batch_size=s.batch_size,
                            eps_warmup=s.eps_warmup, loss=s.loss, cert_weight=s.cert_weight,
                            robust_weight=s.robust_weight, detection_weight=s.detection_weight,
                            natural_weight=s.natural_weight, kappa=s.kappa, bounds=s.bounds,
                            check_every=s.check_every, fpr=o.fpr, fpr_confidence=o.fpr_confidence,
                            max_accuracy_drop=s.max_accuracy_drop, seed=o.seed, device=o.device)
        history, kept = finetune_abstain(ctx.gm, head, (ctx.data.train.x, ctx.data.train.y),
                                         (ctx.data.calibration.x, ctx.data.calibration.y), ctx.data.input_range,
                                         cfg, ctx.progress)
        config: dict[str, Any] = {
            "features": linear.in_features,
            "through": through,
            "eps": cfg.eps,
            "finetune": {**dataclasses.asdict(cfg), "kept_check": kept,
                         "kept_step": history[kept - 1].step if kept else 0},
            "_history": history_json(history),
        }
        return FittedMethod(self.name, config, head.eval(), [through, LOGITS])

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        return AbstainHead(int(config["features"]))
