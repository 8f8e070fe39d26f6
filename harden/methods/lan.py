"""LAN — attention-mask contrast detection (paper 001, Nguyen's thesis, section 3).

Three networks: the classifier f1 (the user's, frozen), an attention model g and a mask classifier f2.

* ``g`` is a Latent Attention Network (Grimm et al. 2017; thesis Eq. 8-9): a three-layer fully connected network
  (the thesis's) mapping an input ``x`` to an attention mask ``m = g(x)`` in ``[0, 1]`` of the input's shape.  It
  is trained against the frozen classifier: the values the mask leaves out are replaced by noise ``eta``,
  ``x~ = m * x + (1 - m) * eta``, and the loss ``CE(f1(x~), f1's class of x) + beta * mean(m)`` asks the classifier
  to keep its decision on ``x~`` while the mask keeps as little of ``x`` as it can.  The thesis writes the same
  thing with the corruption mask ``A = 1 - m``: ``x~ = A eta + (1 - A) x`` and ``L_F - beta * mean(A)``, which
  differs from ours by the constant ``beta``.  A fresh ``eta ~ H`` is drawn for every input at every step (the
  expectation of Eq. 9); ``H`` is ``noise``: ``gaussian`` (per input value, the training split's mean and
  standard deviation, clipped to the input range) or ``uniform`` (over the input range).
* ``f2`` is a small LeNet-like CNN (the thesis's choice) trained on the masks of the training split, labelled by
  the classifier's own class (the alarm compares f2 with the classifier, not with the truth).

The head computes ``g`` and ``f2`` in the graph and returns the raw score
``1 - softmax(f2(g(x)))[argmax f1(x)]``: one minus f2's probability of the classifier's class, in ``[0, 1]``,
higher = more suspicious.  The thesis alarms when f2's class differs from the classifier's, i.e. roughly when
the score passes 1/2; here, as for every method, calibration sets the threshold for ``--fpr``.

The key seeds g's and f2's initialisation, batch order and noise draws: an attacker without the key does not
have this g and f2 and trains its own pair (``harden evaluate --adaptive-proxy``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harden.core.options import OptionSet, option
from harden.errors import HardenError
from harden.methods.base import INPUT, LOGITS, FitContext, FittedMethod, Method, key_fingerprint, key_seed, register_method
from harden.train.parallel import DataParallel

NAME = "lan"
# f2 agreeing with the classifier on less than this multiple of chance (1 / classes) on the training split means g
# learnt one mask for every input (the LAN loss has that degenerate optimum: a fixed region the classifier can
# decide from); on the calibration split, that f2 learnt the training masks by heart.  Such a detector says nothing
# about the input, so the fit is refused.
MIN_AGREEMENT_OVER_CHANCE = 2.0
NOISES = ("gaussian", "uniform")
F2_INPUTS = ("mask", "standardised")


@dataclass(frozen=True)
class LanOptions(OptionSet):
    """Every option of the method: type, default, help and valid range in one place."""

    beta: float = option(0.5, "weight of the sparsity term beta * mean(mask) in g's loss (Eq. 9): larger keeps fewer "
                              "input values", minimum=0.0)
    noise: str = option("gaussian", "noise H replacing what the mask leaves out: gaussian (per-value mean and std of "
                                    "the training split) or uniform (over the input range)", choices=NOISES)
    g_hidden: int = option(256, "width of g's two hidden fully connected layers", minimum=1, maximum=65536)
    g_steps: int = option(1500, "Adam steps training g", minimum=1, maximum=10_000_000)
    f2_width: int = option(16, "channels of f2's first convolution (its second has twice as many)", minimum=1,
                           maximum=4096)
    f2_steps: int = option(1500, "Adam steps training f2 on the training split's masks", minimum=1,
                           maximum=10_000_000)
    batch_size: int = option(64, "inputs per training step of g and f2", minimum=1, maximum=1_000_000)
    learning_rate: float = option(1e-3, "Adam learning rate of g and f2", minimum=0.0, strict=True, maximum=1.0)
    f2_input: str = option("mask", "what f2 reads: mask (g's mask, the thesis's) or standardised (the mask minus the "
                                   "training split's mean mask, over its per-value standard deviation)",
                           choices=F2_INPUTS)


# --------------------------------------------------------------------------- networks


class AttentionNet(nn.Module):
    """g: x -> attention mask in [0, 1] of x's shape; three fully connected layers (the thesis's)."""

    def __init__(self, input_shape: tuple[int, ...], hidden: int):
        super().__init__()
        size = int(np.prod(input_shape))
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, size), nn.Sigmoid(), nn.Unflatten(1, tuple(input_shape)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MaskClassifier(nn.Module):
    """f2: a LeNet-like CNN on masks: two 3x3 convolutions with 2x2 max pooling, then two linear layers."""

    HIDDEN = 64

    def __init__(self, input_shape: tuple[int, ...], width: int, num_classes: int):
        super().__init__()
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise HardenError(f"lan's mask classifier needs inputs of at least 4x4 values; got {h}x{w}")
        self.layers = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), self.HIDDEN), nn.ReLU(),
            nn.Linear(self.HIDDEN, num_classes),
        )

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.layers(mask)


class Standardised(nn.Module):
    """mask -> (mask - mean) / std per value, the training split's statistics (buffers: saved with the head).

    On inputs where the classifier needs most of the input (32x32 colour shapes), g keeps nearly the same mask for
    every input: what carries the input is the small deviation from that common mask, which f2 then sees at unit
    scale (measured on mobilenet-shapes: f2's training agreement 13.7% on raw masks, 49% standardised)."""

    FLOOR = 1e-2
    """Least std divided by: a value g keeps (nearly) constant carries no input, and dividing by its ~1e-7 spread
    would blow float32 rounding up to whole units (measured: onnxruntime's score 0.5 from torch's on cnn-digits).
    Masks lie in [0, 1]: the floor scales a deviation, and its rounding, by 100 at most."""

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros((1, *input_shape)))
        self.register_buffer("std", torch.ones((1, *input_shape)))

    def fit(self, masks: torch.Tensor) -> "Standardised":
        self.mean.copy_(masks.mean(0, keepdim=True))
        self.std.copy_(masks.std(0, keepdim=True).clamp(min=self.FLOOR))
        return self

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask - self.mean) / self.std


class RawMask(nn.Identity):
    """mask -> mask: f2 reads g's mask as the thesis has it."""

    def fit(self, masks: torch.Tensor) -> "RawMask":
        return self


F2_INPUT_LAYERS = {"mask": RawMask, "standardised": Standardised}
"""Per ``f2_input``: the layer between g's mask and f2."""


class LanHead(nn.Module):
    """(input, logits) -> 1 - softmax(f2(f2_input(g(input))))[argmax logits], [N] float32."""

    def __init__(self, g: AttentionNet, f2: MaskClassifier, f2_input: nn.Module | None = None):
        super().__init__()
        self.g = g
        self.f2_input = f2_input if f2_input is not None else RawMask()
        self.f2 = f2

    def mask_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.f2(self.f2_input(self.g(x))), dim=1)

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        cls = logits.argmax(dim=1, keepdim=True)
        return 1.0 - self.mask_probabilities(x).gather(1, cls).squeeze(1)


def seeded(build, seed: int) -> nn.Module:
    """``build()`` with torch's global generator at ``seed`` (the caller's generator state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_networks(config: dict[str, Any]) -> tuple[AttentionNet, MaskClassifier, nn.Module]:
    """g, f2 and the layer between them, as ``config`` describes them (bundles written before ``f2_input``
    existed read the mask)."""
    shape = tuple(config["input_shape"])
    f2_input = config.get("options", {}).get("f2_input", "mask")
    return (AttentionNet(shape, int(config["g_hidden"])),
            MaskClassifier(shape, int(config["f2_width"]), int(config["num_classes"])),
            F2_INPUT_LAYERS[f2_input](shape))


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the classifier while g learns through it; both restored after."""
    saved = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in saved[1]:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(saved[0])
        for p, flag in saved[1]:
            p.requires_grad_(flag)


class Noise:
    """The corruption distribution H, sampled with an explicit generator (so training is seeded)."""

    def __init__(self, kind: str, x_train: torch.Tensor, input_range: tuple[float, float]):
        self.kind = kind
        self.lo, self.hi = float(input_range[0]), float(input_range[1])
        self.mean = x_train.mean(0, keepdim=True)
        self.std = x_train.std(0, keepdim=True)

    def sample(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "uniform":
            return self.lo + (self.hi - self.lo) * torch.rand(shape, generator=generator)
        return (self.mean + self.std * torch.randn(shape, generator=generator)).clamp(self.lo, self.hi)


def lan_loss(classifier: nn.Module, g: nn.Module, x: torch.Tensor, labels: torch.Tensor, eta: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy, mask mean) of Eq. 8-9 for one draw of the noise ``eta``."""
    mask = g(x)
    corrupted = mask * x + (1.0 - mask) * eta
    cross_entropy = F.cross_entropy(classifier(corrupted), labels)
    mask_mean = mask.mean()
    return cross_entropy + beta * mask_mean, cross_entropy, mask_mean


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices, epoch after epoch of seeded permutations."""
    taken = 0
    while taken < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if taken == steps:
                return
            yield order[start : start + batch_size]
            taken += 1


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


class _LanObjective(nn.Module):
    """g's loss (Eq. 8-9) as a module whose parameters are g's, for DistributedDataParallel; the classifier it
    runs through is frozen (its parameters need no gradient, so DDP leaves them alone)."""

    def __init__(self, classifier: nn.Module, g: AttentionNet, beta: float):
        super().__init__()
        self.classifier = classifier
        self.g = g
        self.beta = beta

    def forward(self, x: torch.Tensor, labels: torch.Tensor, eta: torch.Tensor):
        return lan_loss(self.classifier, self.g, x, labels, eta, self.beta)


class _Classified(nn.Module):
    """f2's cross-entropy on (mask, class) pairs, as a module for DistributedDataParallel."""

    def __init__(self, f2: MaskClassifier):
        super().__init__()
        self.f2 = f2

    def forward(self, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.f2(masks), labels)


def train_attention(classifier: nn.Module, x: torch.Tensor, labels: torch.Tensor, noise: Noise, opts: LanOptions,
                    seed: int, progress=lambda message, fraction: None) -> tuple[AttentionNet, list[dict]]:
    """g trained with Adam on the LAN loss against the frozen classifier; returns g and its loss history.

    Under torchrun every rank walks the same batches and draws the same noise for the whole batch (one seeded
    stream), computes the loss on its rows, and DDP all-reduces g's gradients: a single process's training
    within float rounding."""
    generator = torch.Generator().manual_seed(seed)
    g = seeded(lambda: AttentionNet(tuple(x.shape[1:]), opts.g_hidden), seed)
    opt = torch.optim.Adam(g.parameters(), lr=opts.learning_rate)
    history, window, count = [], torch.zeros(3), 0
    every = max(1, opts.g_steps // 10)
    with frozen(classifier):
        dp = DataParallel(_LanObjective(classifier, g, opts.beta))
        g.train()
        for step, idx in enumerate(_batches(len(x), opts.batch_size, opts.g_steps, generator), start=1):
            eta = noise.sample((len(idx), *x.shape[1:]), generator)
            span, weight = dp.span(len(idx))
            rows = idx[span]
            loss, ce, mean = dp.module(x[rows], labels[rows], eta[span])
            opt.zero_grad()
            (loss * weight).backward()
            opt.step()
            window += torch.stack([loss.detach(), ce.detach(), mean.detach()]) * dp.share(idx)
            count += 1
            if step % every == 0 or step == opts.g_steps:
                loss_m, ce_m, mean_m = (float(v) / count for v in dp.sum(window))
                history.append({"step": step, "loss": round(loss_m, 5), "cross_entropy": round(ce_m, 5),
                                "mask_mean": round(mean_m, 5)})
                window, count = torch.zeros(3), 0
                progress(f"lan: training g (step {step}/{opts.g_steps})", 0.05 + 0.6 * step / opts.g_steps)
    return g.eval(), history


def train_mask_classifier(masks: torch.Tensor, labels: torch.Tensor, num_classes: int, opts: LanOptions, seed: int,
                          progress=lambda message, fraction: None) -> MaskClassifier:
    """f2 trained with Adam and cross-entropy on (mask, classifier's class) pairs of the training split (under
    torchrun, data-parallel as g is)."""
    generator = torch.Generator().manual_seed(seed)
    f2 = seeded(lambda: MaskClassifier(tuple(masks.shape[1:]), opts.f2_width, num_classes), seed)
    opt = torch.optim.Adam(f2.parameters(), lr=opts.learning_rate)
    dp = DataParallel(_Classified(f2))
    every = max(1, opts.f2_steps // 10)
    f2.train()
    for step, idx in enumerate(_batches(len(masks), opts.batch_size, opts.f2_steps, generator), start=1):
        rows, weight = dp.shard(idx)
        loss = dp.module(masks[rows], labels[rows]) * weight
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            progress(f"lan: training f2 (step {step}/{opts.f2_steps})", 0.7 + 0.25 * step / opts.f2_steps)
    return f2.eval()


def _rate(hits: torch.Tensor) -> float | None:
    return round(float(hits.float().mean()), 4) if len(hits) else None


def _refuse_uninformative_masks(head: LanHead, classifier: nn.Module, data, labels: torch.Tensor,
                                masks: torch.Tensor, num_classes: int) -> None:
    """One error line when f2 agrees with the classifier on fewer than twice chance of the training split, or of
    the calibration split it never saw (where f2 learnt the training masks by heart instead)."""
    floor = MIN_AGREEMENT_OVER_CHANCE / num_classes
    with torch.no_grad():
        agreement = {"training": float((_predict(head.mask_probabilities, data.train.x).argmax(1) == labels)
                                       .float().mean())}
        if len(data.calibration):
            f1 = _predict(classifier, data.calibration.x).argmax(1)
            agreement["calibration"] = float((_predict(head.mask_probabilities, data.calibration.x).argmax(1) == f1)
                                             .float().mean())
    if min(agreement.values()) < floor:
        measured = " and ".join(f"{value:.1%} of the {split} split" for split, value in agreement.items())
        raise HardenError(
            f"lan: the mask classifier agrees with the classifier on {measured} (chance is {1 / num_classes:.1%}; "
            f"mask mean {float(masks.mean()):.2f}): the attention masks do not carry the class; another beta, noise "
            "or f2_input may (docs/results/lan.md)")


# --------------------------------------------------------------------------- the method


@register_method
class Lan(Method):
    """Attention mask g(x) of a Latent Attention Network, classified by f2; the alarm contrasts f2 with f1."""

    name = NAME
    option_set = LanOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        started = time.perf_counter()
        options, data = ctx.options, ctx.data
        opts: LanOptions = ctx.settings
        x = data.train.x
        if len(x) < 2:
            raise HardenError("lan needs at least 2 training inputs")
        with torch.no_grad():
            logits = _predict(ctx.gm, x)
        num_classes = int(logits.shape[1])
        if num_classes != data.num_classes:
            raise HardenError(f"the classifier has {num_classes} outputs but the data has {data.num_classes} classes")
        labels = logits.argmax(1)
        noise = Noise(opts.noise, x, data.input_range)

        ctx.progress("lan: training g", 0.05)
        g, history = train_attention(ctx.gm, x, labels, noise, opts,
                                     key_seed(options.key, f"lan:g:{options.seed}") % 2**63, ctx.progress)
        with torch.no_grad():
            masks = _predict(g, x)
            f2_input = F2_INPUT_LAYERS[opts.f2_input](tuple(x.shape[1:])).fit(masks)
            seen = f2_input(masks)
        ctx.progress("lan: training f2", 0.7)
        f2 = train_mask_classifier(seen, labels, num_classes, opts,
                                   key_seed(options.key, f"lan:f2:{options.seed}") % 2**63, ctx.progress)
        head = LanHead(g, f2, f2_input).eval()
        _refuse_uninformative_masks(head, ctx.gm, data, labels, masks, num_classes)

        def facts(split) -> dict[str, Any]:
            with torch.no_grad():
                f1 = _predict(ctx.gm, split.x).argmax(1)
                f2_class = _predict(head.mask_probabilities, split.x).argmax(1)
            return {"f2_accuracy": _rate(f2_class == split.y), "classifier_accuracy": _rate(f1 == split.y),
                    "agreement": _rate(f2_class == f1)}

        config: dict[str, Any] = {
            "input_shape": list(data.input_shape),
            "num_classes": num_classes,
            "g_hidden": opts.g_hidden,
            "f2_width": opts.f2_width,
            "options": opts.to_dict(),
            "score": "1 - softmax(f2(g(x)))[argmax logits]",
            "g_training": history,
            "mask_mean_train": round(float(masks.mean()), 4),
            "train": facts(data.train),
            "test": facts(data.test) if len(data.test) else None,
            "key_fingerprint": key_fingerprint(options.key),
            "fit_seconds": round(time.perf_counter() - started, 2),
        }
        return FittedMethod(self.name, config, head, [INPUT, LOGITS], detector=None, sites=[])

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        return LanHead(*build_networks(config)).eval()
