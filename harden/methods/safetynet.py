"""SafetyNet (paper 004): discrete codes of late ReLU units, an RBF-SVM separating natural from adversarial codes.

Each chosen site's units are quantised into a code (``--code binary``: the unit
is active or not; ``--code quaternary``: how many of three per-unit thresholds
it exceeds, the thresholds being quantiles of that unit's positive activations
on the training split).  At a site that is no rectifier (GELU, SiLU, hardswish,
a squeeze-excitation gate, ...) a unit has no "inactive" value: its thresholds
are quantiles of all its values on the training split (binary: the median).
Features that lie along the last dim (a transformer's tokens x features) are
moved to the channel axis before the reduction.  Each level rises over a narrow one-sided ramp above its
threshold (``ramp``, 0.001 of the site's scale) instead of a step, so that the
rounding difference between torch and onnxruntime moves a code by a fraction of
a level, never a whole one (docs/results/safetynet.md).  The quantisation is a
torch head in the classifier's graph (thresholds are buffers; a subtraction, a
clip and a sum, exported with a dynamic batch) emitting float32 features ``[N, D]``; several sites are concatenated
into one code (the paper's "Det ABC" asks whether any layer looks wrong; here
one SVM over the concatenated code sees every layer at once, so one threshold
is calibrated instead of one per site).

The detector is an RBF SVC (after a StandardScaler) trained on natural (0) and
adversarial (1) codes of a capped, seeded subset of the training split; the
adversarial examples are made by ``--attack`` against the classifier.  The
default is ``pgd:eps=auto``: L-inf PGD at the eps where FGSM halves this
classifier's accuracy (:func:`harden.attacks.strength.resolve_auto_eps`, on a
seeded subset of at most 500 training inputs), so the detector trains on
perturbations of the size that hurts this model, not one number for every
dataset.  The resolved attacks and those strength facts are in the config.
Its raw score is the SVC's decision function (positive = adversarial);
calibration sets the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from harden.detectors.dense_rbf import RbfSvmDetector  # noqa: F401  (re-exported: SafetyNet's detector)
from harden.core.options import OptionSet, option
from harden.errors import HardenError
from harden.graph.analyse import channels_last, describe, feature_extractor
from harden.graph.ops import RECTIFIER_OPS, canonical_op
from harden.graph.trace import module_path, sites as graph_sites
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

NAME = "safetynet"
# Chosen across bench/suite on the calibration splits (docs/results/safetynet.md, "Defaults across the suite"):
# every site with quaternary codes detected 77-100% of FGSM/BIM/PGD on four of six pairs where the paper's last
# site with binary codes detected 2-24%.
DEFAULT_LAYERS = "all"
DEFAULT_CODE = "quaternary"
DEFAULT_ATTACKS = ("pgd:eps=auto",)   # eps=auto: resolved per fit on the training split (harden.attacks.strength)
CODES = {"binary": (), "quaternary": (0.25, 0.5, 0.75)}
REDUCTIONS = ("grid", "none", "max", "mean")
DEFAULT_REDUCE = "grid"   # conv sites: max-pool to about GRID x GRID cells per channel
GRID = 4
# The SVM's cost per input is (support vectors) x (code features). Every suite pair but the ResNet-18 one has at most
# 5,632 features at GRID (docs/results/safetynet.md, "Wide models"); a model above the budget gets a coarser grid,
# so the detector's product stays a small share of a wide classifier's cost (and its fit does not take an hour).
DEFAULT_MAX_FEATURES = 6144
DEFAULT_MAX_TRAIN = 600   # natural training inputs; as many adversarial ones are made from them
DEFAULT_MAX_SV = 500      # support-vector budget: the SVM's cost per input is (support vectors) x D
# ... and a budget on that product, the SVM's multiply-adds per input: wide codes get fewer support vectors.  At
# 600k (3,904 features x 153) the ResNet-18 pair's graph costs 1.07x the classifier (1.08x at 900k, 1.09x at 1.25M;
# target 1.10); it binds above 1,200 code features: on the suite's vgg-digits (290 -> 187 support vectors:
# FGSM/BIM/PGD still 100%, DeepFool 62 -> 56%, within what any refit moves it: 58% at 900k) and the shapes pairs,
# which detect at chance at any budget; on the zoo only efficientnet (366 -> 356, unchanged)
# (docs/results/safetynet.md).
DEFAULT_MAX_SVM_COST = 600_000
C_GRID = (0.1, 1.0, 10.0, 100.0)
GAMMA_FACTORS = (0.1, 0.3, 1.0, 3.0)  # times sklearn's "scale" gamma, 1 / (D * Var(X))
CV_FOLDS = 3
AUC_TIE = 0.002   # CV ROC-AUC differences below this are noise at a few hundred examples per fold
BATCH = 256


# --------------------------------------------------------------------------- the head


class CodeHead(nn.Module):
    """Per site: reduce (conv sites), then code = how many of the unit's thresholds it exceeds; sites concatenated.

    ``thresholds_i`` is ``[levels, D_i]``: binary codes have one level of zeros
    (code = unit > 0); quaternary codes three levels (code 0..3).  A conv site
    (``[N, C, H, W]``) is first reduced: ``grid`` max-pools it to about
    GRID x GRID cells per channel (kernel = stride = ``kernels[i]``, ceil
    mode), ``max`` / ``mean`` pool each channel to one value, ``none`` keeps
    every unit.  The output is float32 ``[N, sum D_i]``.
    """

    def __init__(self, dims: Sequence[int], levels: int, reduce: Sequence[str], kernels: Sequence[int] | None = None,
                 ramps: Sequence[float] | None = None, channels_last: Sequence[bool] | None = None):
        super().__init__()
        if len(dims) != len(reduce):
            raise ValueError("one reduction per site")
        self.dims = [int(d) for d in dims]
        self.reduce = [str(r) for r in reduce]
        self.kernels = [int(k) for k in (kernels if kernels is not None else [1] * len(self.dims))]
        # per site, the width over which a level's count rises from 0 to 1 above its threshold (0: a hard step;
        # bundles written before ramps existed)
        self.ramps = [float(w) for w in (ramps if ramps is not None else [0.0] * len(self.dims))]
        # per site, whether its features lie along the last dim (moved to dim 1 before the reduction)
        self.channels_last = [bool(c) for c in (channels_last if channels_last is not None else [False] * len(self.dims))]
        for i, d in enumerate(self.dims):
            self.register_buffer(f"thresholds_{i}", torch.zeros(int(levels), d, dtype=torch.float32))

    def reduced(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        how = self.reduce[i]
        if self.channels_last[i] and activation.dim() > 2:
            activation = activation.movedim(-1, 1)
        if how == "none" or activation.dim() <= 2:
            return activation.flatten(1)
        if how == "grid":
            k = self.kernels[i]
            if k == 1:   # a 1 x 1 max pool is the identity: no graph node for it
                return activation.flatten(1)
            pool = nn.functional.max_pool2d if activation.dim() == 4 else nn.functional.max_pool1d
            return pool(activation, k, stride=k, ceil_mode=True).flatten(1)
        per_channel = activation.flatten(2)
        return per_channel.amax(dim=2) if how == "max" else per_channel.mean(dim=2)

    def code(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        return self.code_of(i, self.reduced(i, activation).float())

    def code_of(self, i: int, values: torch.Tensor) -> torch.Tensor:
        """Levels exceeded by reduced values [N, D_i]: a step at each threshold, or a one-sided ramp of width
        ``ramps[i]`` above it, so that a value within float rounding of a threshold moves its code by a fraction
        of that rounding over the width, instead of by a whole level, between torch and onnxruntime."""
        thresholds = getattr(self, f"thresholds_{i}").to(values.dtype)
        above = values.unsqueeze(1) - thresholds
        if self.ramps[i] > 0:
            # a NaN value gives a NaN code, so a NaN score, which alarms (harden.detectors.policy)
            return torch.clamp(above / self.ramps[i], 0.0, 1.0).sum(dim=1)
        return (above > 0).to(values.dtype).sum(dim=1)

    def forward(self, *activations: torch.Tensor) -> torch.Tensor:
        values = [self.reduced(i, a).float() for i, a in enumerate(activations)]
        if not all(w > 0 for w in self.ramps):   # hard steps (bundles written before ramps): site by site
            return torch.cat([self.code_of(i, v) for i, v in enumerate(values)], dim=1)
        # Every site's values joined, then ONE ramp chain over them: the same numbers as site by site (each
        # feature meets its own thresholds and width), in one chain of nodes instead of one per site.  On a ResNet-18
        # (17 sites, 3,904 features under ``max_features``) that took the exported graph from 1.124 to 1.118x the
        # classifier (batch 64, one thread); at 19,456 features the joined [N, levels, D] intermediates (15 MB)
        # outgrew the cache and one joined subtraction cost more than the 17 per-site ones.  A NaN value is left
        # NaN (Clip keeps it in torch and onnxruntime alike): the score is NaN and alarms.  Counting it as no
        # level, as the step's comparison does, cost an IsNaN and a Where over every feature (0.26 ms of the
        # ResNet-18's 40) and let an input that drives a unit to NaN pass as one whose unit is off.
        joined = torch.cat(values, dim=1)
        thresholds = torch.cat([getattr(self, f"thresholds_{i}") for i in range(len(self.dims))], dim=1)
        widths = torch.cat([torch.full((d,), w) for d, w in zip(self.dims, self.ramps)])
        return torch.clamp((joined.unsqueeze(1) - thresholds) / widths, 0.0, 1.0).sum(dim=1)


def reduction_plan(shape: Sequence[int], how: str, grid: int) -> tuple[str, int, int]:
    """(reduction, pooling kernel, feature count) of one site of per-sample ``shape`` ([C, H, W], [C, L] or [D])."""
    shape = [int(s) for s in shape]
    if len(shape) <= 1 or how == "none":
        return "none", 1, int(np.prod(shape))
    channels, spatial = shape[0], shape[1:]
    if how in ("max", "mean"):
        return how, 1, channels
    k = max(1, math.ceil(max(spatial) / grid))
    cells = int(np.prod([math.ceil(s / k) for s in spatial]))
    return "grid", k, channels * cells


def budgeted_plans(shapes: Sequence[Sequence[int]], how: str, grid: int, max_features: int
                   ) -> tuple[list[tuple[str, int, int]], int]:
    """The sites' reduction plans with the grid shrunk (grid, grid - 1, ..., 1) until the codes total at most
    ``max_features``; at grid 1 the plans stand whatever their total. Returns (plans, grid used)."""
    for g in range(grid, 0, -1):
        plans = [reduction_plan(shape, how, g) for shape in shapes]
        if how != "grid" or sum(p[2] for p in plans) <= max_features:
            return plans, g
    return plans, 1


def positive_quantiles(values: torch.Tensor, quantiles: Sequence[float], positive_only: bool = True) -> torch.Tensor:
    """``[len(quantiles), D]``: per unit, quantiles of its strictly positive values (0 for a unit never positive);
    of all its values with ``positive_only=False`` (a site that is no rectifier).

    Each threshold is then moved to the middle of the gap between the observed
    values around it (keeping which training values lie above it), so no
    threshold sits on a value the unit really takes: a unit that sees a blank
    patch outputs relu(bias) for a large share of inputs, a quantile lands
    exactly on that value, and float rounding in onnxruntime would flip its
    code.  Values closer than VALUE_MERGE (relative above 1) count as one:
    the same blank patch seen through slightly different neighbours gives
    values 1e-7..1e-6 apart, and a midpoint between those sits inside the
    rounding difference between torch and onnxruntime (2e-6 to 2e-5 on the
    suite's ReLU6 net).  Thresholds are non-decreasing across levels, so the
    code counts the levels exceeded.
    """
    values = values.detach().float().cpu()
    q = torch.tensor([float(v) for v in quantiles], dtype=torch.float32)
    out = torch.zeros(len(q), values.shape[1], dtype=torch.float32)
    if len(q) == 0:
        return out
    positive = values > 0 if positive_only else torch.isfinite(values)
    for j in range(values.shape[1]):
        column = values[positive[:, j], j].sort().values
        if not column.numel():
            continue
        raw = torch.quantile(column, q)
        lows, highs = _value_clusters(torch.unique(column).double())
        above = torch.searchsorted(lows, raw.double(), right=True)  # first cluster wholly above the quantile
        for level, k in enumerate(above.tolist()):
            floor = 0.0 if positive_only else float(lows[0]) - max(abs(float(lows[0])) * 1e-3, 1e-6)
            low = float(highs[k - 1]) if k > 0 else floor
            high = float(lows[k]) if k < len(lows) else low + max(abs(low) * 1e-3, 1e-6)
            out[level, j] = (low + high) / 2
    return torch.cummax(out, dim=0).values


VALUE_MERGE = 1e-4
# Ramp width, as a fraction of the site's scale (the 99th percentile of its positive reduced values on the
# training split).  torch and onnxruntime differ by up to about 3e-6 of that scale (2e-5 at ReLU6's 6), so a code
# moves by at most ~3e-4 of a level where a step would flip it whole (a flip moved the SVM's score by up to 8e-4
# and broke export parity with every site of the suite's ReLU6 net).  A ramp multiplies the rounding difference by
# 1 / width, so it must not be too narrow either: at 1e-4 of the scale a 96-feature SVM's score moved by 1.2e-4.
RAMP_FRACTION = 1e-3


def ramp_width(values: torch.Tensor, fraction: float = RAMP_FRACTION, positive_only: bool = True) -> float:
    positive = values[values > 0] if positive_only else values[torch.isfinite(values)].abs()
    if not positive.numel() or fraction == 0:
        return 0.0
    sample = positive.flatten()[:: max(1, positive.numel() // 1_000_000)].float()
    return float(f"{fraction * float(torch.quantile(sample, 0.99)):.6g}")  # as the config records it


def _value_clusters(distinct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) value of each run of sorted distinct values whose neighbours lie within VALUE_MERGE."""
    gaps = distinct[1:] - distinct[:-1]
    breaks = torch.nonzero(gaps > VALUE_MERGE * torch.clamp(distinct[1:].abs(), min=1.0)).flatten()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks + 1])
    ends = torch.cat([breaks, torch.tensor([len(distinct) - 1])])
    return distinct[starts], distinct[ends]


# --------------------------------------------------------------------------- the SVM


def fit_svm(x: np.ndarray, y: np.ndarray, *, C: float | None = None, gamma: float | None = None, scaler: bool = False,
            seed: int = 0, grid: dict | None = None):
    """An RBF SVC on the codes (optionally after a StandardScaler); C and gamma by 3-fold CV ROC-AUC unless given.

    Among grid points tied on CV ROC-AUC the one with fewest support vectors wins (see _cheapest_of_the_best).

    The gamma grid is relative to scikit-learn's "scale" rule (1 / (D * Var)),
    measured on the (scaled) training features, and the chosen value is stored
    as an absolute number so the ONNX conversion sees a plain float.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        raise HardenError("safetynet: the detector needs both natural and adversarial training examples")
    steps = [("scale", StandardScaler())] if scaler else []
    transformed = StandardScaler().fit_transform(x) if scaler else x
    variance = float(np.var(transformed))
    base_gamma = 1.0 / (x.shape[1] * variance) if variance > 0 else 1.0
    pipe = Pipeline(steps + [("svc", SVC(kernel="rbf", C=C if C is not None else 1.0,
                                         gamma=gamma if gamma is not None else base_gamma))])
    search = dict(grid or {})
    if C is None and "svc__C" not in search:
        search["svc__C"] = list(C_GRID)
    if gamma is None and "svc__gamma" not in search:
        search["svc__gamma"] = [f * base_gamma for f in GAMMA_FACTORS]
    smallest = int(np.bincount(y).min())
    if not search or smallest < CV_FOLDS:
        return pipe.fit(x, y)
    cv = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed % 2**32)
    found = GridSearchCV(pipe, search, scoring="roc_auc", cv=cv, n_jobs=1, refit=False).fit(x, y)
    return _cheapest_of_the_best(pipe, found.cv_results_, x, y)


def _cheapest_of_the_best(pipe, results: dict, x: np.ndarray, y: np.ndarray):
    """Refit the grid points whose CV ROC-AUC is within AUC_TIE of the best; keep the one with fewest support vectors.

    On well separated codes many grid points tie near AUC 1 and the first in
    grid order (the smallest C: the softest margin) has the most support
    vectors, i.e. the slowest detector for no measured gain.  Ties on the
    count go to the higher CV score.
    """
    from sklearn.base import clone

    scores = np.asarray(results["mean_test_score"], dtype=float)
    best = float(np.nanmax(scores))
    candidates = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= best - AUC_TIE]
    fitted = [clone(pipe).set_params(**results["params"][i]).fit(x, y) for i in candidates]
    return min(fitted, key=support_vectors)   # min keeps the first (highest score) among equal counts


def support_vectors(estimator) -> int:
    svc = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return int(svc.n_support_.sum())


def within_budget(estimator, x: np.ndarray, y: np.ndarray, max_sv: int, seed: int = 0):
    """Refit on stratified random subsets (same C and gamma) until at most ``max_sv`` support vectors remain.

    An RBF SVM costs (support vectors) x D multiply-adds per input, and the
    count grows with the training set, so the budget is kept by training on
    fewer examples.  Returns (estimator, training examples used).
    """
    from sklearn.base import clone

    rng = np.random.default_rng(seed % 2**32)
    used = np.arange(len(y))
    for _ in range(8):
        count = support_vectors(estimator)
        if count <= max_sv:
            break
        fraction = 0.95 * max_sv / count
        keep = []
        for label in (0, 1):
            members = used[y[used] == label]
            keep.append(rng.choice(members, size=max(CV_FOLDS, int(len(members) * fraction)), replace=False))
        used = np.sort(np.concatenate(keep))
        estimator = clone(estimator).fit(x[used], y[used])
    return estimator, int(len(used))


# --------------------------------------------------------------------------- fitting


def _features(gm: fx.GraphModule, head: CodeHead, sites: list[str], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, D], predicted labels [N]) of ``x`` through the classifier and the head."""
    extractor = feature_extractor(gm, sites)
    codes, predictions = [], []
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            logits, *acts = extractor(x[start : start + BATCH])
            codes.append(head(*acts).numpy())
            predictions.append(logits.argmax(1).numpy())
    return np.concatenate(codes), np.concatenate(predictions)


def _site_values(gm: fx.GraphModule, head: CodeHead, sites: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Per site, the reduced activations [N, D_i] the thresholds are compared with."""
    extractor = feature_extractor(gm, sites)
    parts: list[list[torch.Tensor]] = [[] for _ in sites]
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            _, *acts = extractor(x[start : start + BATCH])
            for i, a in enumerate(acts):
                parts[i].append(head.reduced(i, a).float())
    return [torch.cat(p) for p in parts]


@dataclass(frozen=True)
class SafetyNetOptions(OptionSet):
    layers: str = layers_option(DEFAULT_LAYERS)
    code: str = option(DEFAULT_CODE, "binary (active or not) | quaternary (three thresholds per unit)",
                       choices=tuple(CODES))
    attacks: tuple[str, ...] = option(DEFAULT_ATTACKS, "attacks making the adversarial training examples (eps=auto: "
                                                       "the eps at which FGSM halves the classifier's accuracy on the "
                                                       "training split)")
    max_train: int = option(DEFAULT_MAX_TRAIN, "natural training inputs (as many adversarial ones are made)",
                            minimum=1)
    max_sv: int = option(DEFAULT_MAX_SV, "support-vector budget (the SVM's cost per input grows with it)", minimum=1)
    max_svm_cost: int = option(DEFAULT_MAX_SVM_COST, "budget on support vectors x code features (the SVM's "
                                                     "multiply-adds per input): wide codes get fewer support vectors",
                               minimum=1)
    svm_c: float | None = option(None, "SVM C (default: cross-validated grid)", minimum=0.0, strict=True)
    svm_gamma: float | None = option(None, "RBF gamma (default: cross-validated grid)", minimum=0.0, strict=True)
    reduce: str = option(DEFAULT_REDUCE, "conv sites: grid (max-pool to about grid x grid cells per channel) | none "
                                         "| max | mean", choices=REDUCTIONS)
    grid: int = option(GRID, "cells per side of the grid reduction", minimum=1)
    max_features: int = option(DEFAULT_MAX_FEATURES, "grid: when the codes exceed this many features, the grid "
                                                     "shrinks until they fit (down to 1 cell per channel)",
                               minimum=1)
    code_quantiles: tuple[float, ...] = option(CODES["quaternary"], "quaternary: the three quantiles of each unit's "
                                                                     "positive activations that split its levels")
    ramp: float = option(RAMP_FRACTION, "width of each level's ramp, a fraction of the site's 99th percentile "
                                        "(0: steps)", minimum=0.0, maximum=0.999)
    success_only: bool = option(False, "train on the adversarial examples that fool the classifier only")
    scaler: bool = option(False, "standardise the codes before the SVM")

    def check(self, owner: str) -> None:
        from harden.attacks.strength import check_training_attacks

        check_training_attacks(self.attacks, owner)
        if self.code != "binary" and (len(self.code_quantiles) != 3 or not all(0.0 <= q < 1.0 for q in self.code_quantiles)):
            raise HardenError(f"{owner}: quaternary codes need three code_quantiles in [0, 1); got "
                              f"{list(self.code_quantiles)}")


@register_method
class SafetyNet(Method):
    """Quantised codes of late ReLU units (binary or quaternary) and an RBF SVM trained on natural vs adversarial
    codes."""

    name = NAME
    option_set = SafetyNetOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        from harden.attacks.strength import auto_eps_facts, resolve_auto_eps
        from harden.attacks.catalog import parse_attack, run_attack

        options, data, gm, s = ctx.options, ctx.data, ctx.gm, ctx.settings
        code = s.code
        # eps=auto (the default): the eps at which FGSM halves this classifier's accuracy, measured once on a
        # seeded subset of the TRAINING split, substituted before the texts are parsed.
        ctx.progress("safetynet: attack strength", 0.01)
        texts, strength = resolve_auto_eps(list(s.attacks), gm, data.train.x, data.train.y,
                                           input_range=data.input_range, num_classes=data.num_classes,
                                           seed=key_seed(options.key, f"safetynet:auto-eps:{options.seed}"))
        specs = [parse_attack(text) for text in texts]
        max_train, max_sv, grid, svm_c, svm_gamma = s.max_train, s.max_sv, s.grid, s.svm_c, s.svm_gamma
        reduce, success_only, scaler, ramp = s.reduce, s.success_only, s.scaler, s.ramp
        quantiles = tuple(s.code_quantiles) if code != "binary" else ()

        site_nodes = graph_sites(gm)
        paths = {n.name: module_path(n) for n in site_nodes}
        chosen = select_sites([n.name for n in site_nodes], paths, s.layers)
        infos = {i.name: i for i in describe(gm, data.train.x[:2])}
        nodes = {n.name: n for n in site_nodes}
        shapes = [list(infos[s].shape) for s in chosen]
        last = [len(shape) > 1 and channels_last(gm, nodes[s]) for s, shape in zip(chosen, shapes)]
        rectified = [canonical_op(gm, nodes[s]) in RECTIFIER_OPS for s in chosen]
        plans, grid_used = budgeted_plans([shape[-1:] + shape[:-1] if moved else shape
                                           for shape, moved in zip(shapes, last)], reduce, grid, s.max_features)
        site_reduce, kernels, dims = [p[0] for p in plans], [p[1] for p in plans], [p[2] for p in plans]
        levels = max(1, len(quantiles))
        head = CodeHead(dims, levels, site_reduce, kernels, channels_last=last).eval()

        # Thresholds: binary = 0; quaternary = quantiles of each unit's positive activations on the training split.
        # A site that is no rectifier: quantiles of all the unit's values (binary: the median).
        ctx.progress("safetynet: code thresholds", 0.05)
        values = _site_values(gm, head, chosen, data.train.x)
        head.ramps = [ramp_width(v, ramp, positive_only=r) for v, r in zip(values, rectified)]
        for i, (v, r) in enumerate(zip(values, rectified)):
            site_quantiles = quantiles if code != "binary" else (() if r else (0.5,))
            if site_quantiles:
                getattr(head, f"thresholds_{i}").copy_(positive_quantiles(v, site_quantiles, positive_only=r))

        # Natural (0) and adversarial (1) examples from one seeded subset of the training split; each attack
        # perturbs its own share of the subset, so there are about as many adversarial as natural examples.
        n = min(max_train, len(data.train))
        if n < 2 * len(specs) or n < 2 * CV_FOLDS:
            raise HardenError(f"safetynet needs at least {max(2 * len(specs), 2 * CV_FOLDS)} training examples; "
                              f"--max-train or the training split gives {n}")
        generator = np.random.default_rng(key_seed(options.key, f"safetynet:subset:{options.seed}"))
        subset = np.sort(generator.permutation(len(data.train))[:n])
        x_nat, y_nat = data.train.x[subset], data.train.y[subset]
        nat_codes, nat_pred = _features(gm, head, chosen, x_nat)
        adv_codes, attack_facts = [], []
        for j, (spec, chunk) in enumerate(zip(specs, np.array_split(np.arange(n), len(specs)))):
            ctx.progress(f"safetynet: attack {spec.label()}", 0.1 + 0.6 * j / len(specs))
            x_clean = x_nat[chunk].numpy()
            truth = y_nat[chunk].numpy()
            x_adv = run_attack(gm, spec, x_clean, truth, input_range=data.input_range, num_classes=data.num_classes,
                               seed=key_seed(options.key, f"safetynet:attack:{j}"))
            codes, pred = _features(gm, head, chosen, torch.from_numpy(x_adv))
            was_right = nat_pred[chunk] == truth
            fooled = was_right & (pred != truth)
            changed = np.abs(x_adv - x_clean).reshape(len(chunk), -1).max(axis=1) > 0
            # Default: every perturbed output of a correctly classified input (the paper trains on the attack's
            # outputs; measured better than keeping only the ones that fool, docs/results/safetynet.md).
            keep = fooled if success_only else (was_right & changed)
            adv_codes.append(codes[keep])
            attack_facts.append({"attack": spec.label(), "inputs": int(len(chunk)), "fooled": int(fooled.sum()),
                                 "kept": int(keep.sum())})
        adv = np.concatenate(adv_codes)
        if len(adv) < CV_FOLDS:
            raise HardenError(f"safetynet: the attacks ({', '.join(s.label() for s in specs)}) gave only {len(adv)} "
                              f"usable adversarial examples from {n} training inputs; use a stronger --attack or a "
                              f"larger --max-train")
        x_svm = np.concatenate([nat_codes, adv]).astype(np.float32)
        y_svm = np.concatenate([np.zeros(len(nat_codes), dtype=int), np.ones(len(adv), dtype=int)])

        ctx.progress("safetynet: fitting the RBF SVM", 0.75)
        pipeline = fit_svm(x_svm, y_svm, C=svm_c, gamma=svm_gamma, scaler=scaler,
                           seed=key_seed(options.key, "safetynet:cv"))
        fitted_sv = support_vectors(pipeline)
        total_dim = int(sum(dims))
        max_sv = max(1, min(max_sv, s.max_svm_cost // max(1, total_dim)))
        pipeline, used = within_budget(pipeline, x_svm, y_svm, max_sv, seed=key_seed(options.key, "safetynet:budget"))
        # codes within a ramp are fractions: the SVM's product with them is not exact in float32, but centred on
        # integers it stays within the float64 graph's parity (harden.detectors.dense_rbf._centred_graph)
        detector = RbfSvmDetector(pipeline, self.name, total_dim, exact_int=not any(w > 0 for w in head.ramps),
                                  centred=True)
        svc = detector.svc
        config: dict[str, Any] = {
            "sites": chosen,
            "shapes": shapes,
            "dims": dims,
            "reduce": site_reduce,
            "kernels": kernels,
            "ramps": list(head.ramps),
            "channels_last": last,
            "rectified": rectified,
            "code": code,
            "levels": levels,
            "quantiles": list(quantiles),
            "features": total_dim,
            "grid": {"asked": grid, "used": grid_used, "max_features": s.max_features} if reduce == "grid" else None,
            "attacks": [s.label() for s in specs],
            "attack_strength": auto_eps_facts(strength, len(data.train)),
            "training": {"natural": int(len(nat_codes)), "adversarial": int(len(adv)), "success_only": success_only,
                         "per_attack": attack_facts, "svm_examples": used},
            "svm": {"C": float(svc.C), "gamma": float(svc._gamma), "support_vectors": support_vectors(pipeline),
                    "support_vectors_before_budget": fitted_sv, "max_support_vectors": max_sv,
                    "max_svm_cost": s.max_svm_cost,
                    "scaler": "standard" if scaler else "none",
                    "algebra": ("float64" if not detector.centred else
                                "float32 products around integer centres, float64 after")},
            "key_fingerprint": key_fingerprint(options.key),
        }
        ctx.progress("safetynet: done", 1.0)
        return FittedMethod(self.name, config, head, list(chosen), detector=detector, sites=list(chosen))

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        return CodeHead(config["dims"], config["levels"], config["reduce"], config.get("kernels"),
                        config.get("ramps"), config.get("channels_last")).eval()
