"""NIC — neural-network invariant checking (paper 002): value and provenance invariants learnt from benign data only.

For each chosen site (default: the 8 deepest element-wise activations) the torch head computes

* the site's *reduced* features: global average pool per channel for a conv activation ``[N, C, H, W] -> [N, C]``
  (``nic_reduce``: ``mean`` | ``max`` | ``meanmax``), fully-connected activations as they are;
* standardised with the training split's mean and std (buffers of the head), in float64 from the reduction on
  (so torch and onnxruntime agree on the standardised values: see :meth:`NICHead.reduce`);
* passed through the detector set's keyed, non-differentiable transform ``g`` (per feature: a random scale and
  ``floor`` or ``ceil``, then the scale divided back out; the paper's "random scaling combined with discrete
  floor and ceiling functions");
* a *derived model* (probe): a linear layer + softmax on those frozen features, TRAINED with cross-entropy on the
  training split's labels (two public ports forgot to train it; :attr:`NICFit.probe_accuracy` records how well
  each one predicts).

The classifier's own softmax is the last derived model (``nic_output``, default on): in the paper the derived
model of the last layer is the model itself, and the pair (last hidden site's probe, the model's output) is what
sees an input pushed just across a decision boundary (measured on LeNet-5 / MNIST calibration adversarial examples
at 5% FPR: CW detection 0.41 -> 0.82, DeepFool 0.60 -> 0.92, the gradient L-inf attacks unchanged or better).

The head outputs, for each detector set, ``[g(z_1) .. g(z_S) | softmax_1 .. softmax_S (, softmax(logits))]``
concatenated as ``nic.features [N, D]``.  The detector (one ONNX graph, :mod:`harden.detectors.nic_onnx`) slices
that vector and runs (as float64 ONNX algebra, :mod:`harden.detectors.dense_rbf`) one one-class RBF SVM per site (value invariant), one per pair of consecutive derived models
on their concatenated softmax (provenance invariant), and a final one-class SVM over the invariant scores.  Every
one-class decision function is negated, so higher = more suspicious.  Thresholds are set later by calibration.

Only benign data is used: the training split is divided (seeded by the key) into a part that fits the probes'
and invariants' SVMs and a held-out part on which the invariant scores are out-of-sample, to fit the final SVM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harden.core.distributed import map_chunks
from harden.core.options import OptionSet, option
from harden.detectors.finite_rows import score_finite_rows
from harden.errors import HardenError
from harden.graph.analyse import batches, channels_last, describe, feature_extractor
from harden.graph.trace import module_path, sites as graph_sites
from harden.methods.base import (
    LOGITS,
    FitContext,
    FittedMethod,
    Method,
    key_fingerprint,
    key_seed,
    layers_option,
    register_method,
    select_sites,
)

INVARIANTS = ("value", "provenance", "both")
REDUCTIONS = ("mean", "max", "meanmax")

# Defaults chosen by measurement across FGSM, BIM, PGD, DeepFool and CW on LeNet-5 / MNIST, with adversarial
# examples made on the CALIBRATION split (never the test split the results are reported on); see
# docs/results/nic.md.
DEFAULT_NU = 0.01          # one-class SVMs of the invariants (few support vectors: see DEFAULT_GAMMA)
DEFAULT_FINAL_NU = 0.1     # the final one-class SVM over the invariant scores
# RBF gamma = DEFAULT_GAMMA / n_features (features are standardised; 1.0 is sklearn's 'scale').  Measured on
# calibration-split pools at 5% FPR (docs/results/nic.md): gamma 10 with nu 0.1 gave the best worst-attack
# detection (0.92) but made most training rows support vectors (latency 6.5x the classifier at batch 256); gamma 1
# with nu 0.01 gives 0.89 (mean 0.94 against 0.96) with ~50 support vectors per SVM (1.7x).
DEFAULT_GAMMA = 1.0
# The provenance invariants (SVMs on pairs of softmaxes) get their own, narrower kernel: with gamma 1/n the
# confident, near one-hot benign softmaxes sit on the boundary of a wide support and an input pushed just across
# a decision boundary lands INSIDE it (measured: its invariant score is lower than any benign one); gamma 3/n
# makes the space between classes a low-density region.  Chosen on calibration-split pools of FGSM, BIM, PGD,
# CW and DeepFool (bench/experiments/nic_fusion.py, 4 gammas x 3 nus, two classifiers: the example and one
# trained on the training split only): best worst-attack detection on the example (0.917 against 0.891) and
# best mean on both; about twice the provenance support vectors (docs/results/nic.md).
DEFAULT_PROVENANCE_GAMMA = 3.0
DEFAULT_PROVENANCE_NU = 0.05
DEFAULT_FINAL_GAMMA = 1.0  # the final SVM's gamma = DEFAULT_FINAL_GAMMA / number of invariants
DEFAULT_REDUCE = "mean"
# onnxruntime's blocked (NCHWc) layout holds conv maps whose channel count is a multiple of this (8 with AVX2);
# such a map's row means are an average pool, any other's a ReduceSum (see NICHead.spatial_mean)
ROW_BLOCK = 8
DEFAULT_MAX_TRAIN = 4000   # cap on training rows per one-class SVM (fit time grows ~quadratically)
DEFAULT_HOLDOUT = 1 / 3    # fraction of the training split held out to fit the final SVM
SCALE_RANGE = (4.0, 16.0)  # g: per-feature scale, uniform in this range (steps per standard deviation)
# g: width of the ramp at each jump, as a fraction of a step.  The ramp multiplies a torch/onnxruntime rounding
# difference in a feature by 1/ramp; with gamma 10/n_features, 0.05 broke export parity (1.3e-4 to 1.9e-4 > 1e-4)
# while 0.2 kept it at 2.6e-5 to 7.3e-5 over four keys, at the same detection (calibration pools, 5% FPR).
# (That was with a float32 head and float32 SVMs; with the float64 standardisation and SVMs the differences are
# 1e-5 to 3e-5 for every invariant setting, measured on LeNet-5.)
DEFAULT_RAMP = 0.2
# A feature that barely varies on the training split (a spread of 1e-4 of its value) is standardised into units
# in which float32 rounding is no longer small: runs of one model that differ only in summation order (batch
# size, threads, torch against onnxruntime) then moved NIC's score by 0.6 (a composite of the zoo's blocks; its
# bundle failed its own reload check).  The spread is floored at this many times the feature's rounding, measured
# as |float32 - float64 classifier| on training rows, so that rounding moves a standardised feature by ~1e-4.
DEFAULT_ROUNDING_HEADROOM = 1e4
ROUNDING_ROWS = 256
DEFAULT_OUTPUT_PROBE = True  # the classifier's softmax is the last derived model of the provenance chain


# --------------------------------------------------------------------------- head


class NICHead(nn.Module):
    """Site activations -> ``[N, D]``: per detector set, transformed standardised features then probe softmaxes."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.dims = [int(d) for d in config["dims"]]
        self.spatial = [bool(s) for s in config["spatial"]]
        self.reduce_mode = str(config.get("reduce", DEFAULT_REDUCE))
        # per site, how row means are taken in float32 (see spatial_mean); bundles without the field: "avgpool"
        self.rows = [str(r) for r in config.get("rows", ["avgpool"] * len(self.dims))]
        # per site, whether its features lie along the last dim (tokens x features): moved to dim 1 first
        self.channels_last = [bool(c) for c in config.get("channels_last", [False] * len(self.dims))]
        self.sets = int(config["sets"])
        self.num_classes = int(config["num_classes"])
        self.value = bool(config["value"])
        self.provenance = bool(config["provenance"])
        self.transform = bool(config.get("transform", True))
        # The classifier's own softmax closes the provenance chain (the paper's last derived model IS the model).
        self.output_probe = bool(config.get("output_probe", False))
        self.ramp = float(config.get("ramp", DEFAULT_RAMP))
        for i, d in enumerate(self.dims):
            self.register_buffer(f"mean_{i}", torch.zeros(d))
            self.register_buffer(f"std_{i}", torch.ones(d))
            for k in range(self.sets):
                if self.transform:
                    self.register_buffer(f"scale_{k}_{i}", torch.ones(d))
                    self.register_buffer(f"ceil_{k}_{i}", torch.zeros(d, dtype=torch.bool))
                if self.provenance:
                    self.add_module(f"probe_{k}_{i}", nn.Linear(d, self.num_classes))

    # Float64 from the reduction to the standardised features, rounded to float32 for g.  Measured on LeNet-5:
    # in float32 the per-channel mean of relu1 (576 positions) differed between torch and onnxruntime by 1.5e-7
    # (summation order; the activations themselves were identical); the standardisation multiplies that by 1/std
    # (std 0.015) and g's ramp by 1/ramp, and the value invariant's score differed by 2.2e-4 > the 1e-4 export
    # tolerance.  Casting the whole activation to float64 fixed it but cost 1.7 ms at batch 256 (a fifth of
    # LeNet-5); summing along the last axis in float32 first (a few values: error a few ulps of a short sum)
    # and the rest in float64 keeps the rounding difference ~100x smaller at the cost of a float32 ReduceSum.

    def reduce(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        """The site's reduced features, float64."""
        if self.channels_last[i] and activation.dim() > 2:
            activation = activation.movedim(-1, 1)
        if not self.spatial[i]:
            return activation.flatten(1).double()
        if self.reduce_mode == "max":
            return activation.flatten(2).amax(dim=2).double()  # exact in float32
        mean = self.spatial_mean(i, activation)
        if self.reduce_mode == "mean":
            return mean
        return torch.cat([mean, activation.flatten(2).amax(dim=2).double()], dim=1)

    def spatial_mean(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        """Per-channel mean of ``[N, C, ...]``, float64: float32 row means along the last axis, then float64.

        How the float32 row means are written is per site (config ``"rows"``), for onnxruntime's sake only (the
        values agree to float32 rounding): ``"avgpool"``, an average pool of kernel ``(1, W)``, which onnxruntime
        runs in the blocked (NCHWc) layout of the convolutions around it; ``"sum"``, a ReduceSum over the last
        axis then a float64 division, for a map onnxruntime keeps in plain NCHW anyway (its blocked kernels take
        channel counts that are a multiple of the block, 8 here), where an average pool of kernel ``(1, W)`` is
        slow.  Measured with onnxruntime's profiler at batch 256 on LeNet-5:
        relu1 [6, 28, 28] AveragePool 544 us, ReduceSum 282 us; relu2 [16, 10, 10] AveragePool (blocked) 89 us +
        a 25 us reorder, ReduceSum 197 us + a 222 us reorder.  Bundles without the field used "avgpool".
        """
        if activation.dim() < 4:
            return activation.double().flatten(2).mean(dim=2)
        if self.rows[i] == "sum":
            rows = activation.sum(dim=-1).double() / activation.shape[-1]
        elif activation.dim() == 4:
            rows = nn.functional.avg_pool2d(activation, (1, activation.shape[-1])).double()
        else:
            rows = activation.mean(dim=-1).double()
        return rows.flatten(2).mean(dim=2)

    def standardised(self, i: int, activation: torch.Tensor) -> torch.Tensor:
        """(reduced - mean) / std, float64 (the buffers are float32, promoted)."""
        return (self.reduce(i, activation) - getattr(self, f"mean_{i}").double()) / getattr(self, f"std_{i}").double()

    def g(self, k: int, i: int, z: torch.Tensor) -> torch.Tensor:
        """The keyed transform of site ``i`` in set ``k``: see :meth:`staircase`."""
        return self.staircase(z, getattr(self, f"scale_{k}_{i}"), getattr(self, f"ceil_{k}_{i}"))

    def staircase(self, z: torch.Tensor, scale: torch.Tensor, ceil: torch.Tensor) -> torch.Tensor:
        """Floor or ceil (per feature) of z * scale, divided back by the scale; float32.

        Each jump of the staircase is a linear ramp of width ``ramp`` (a fraction of a step), so g is
        continuous: its gradient is zero on the other (1 - ramp) of the line, but a value that float rounding
        puts a hair apart in torch and onnxruntime lands a hair apart after g too, instead of a whole step
        apart (with pure floor/ceil about 1 feature in 5,000 LeNet rows did, and export parity failed).
        ``z`` comes from :meth:`standardised` in float64 and is rounded to float32 here: torch and onnxruntime
        then agree on it bit for bit (but where the two float64 values straddle a float32 rounding boundary),
        and every operation below is correctly rounded IEEE arithmetic, the same in both.  (In float64 the
        staircase cost twice as much in onnxruntime at the same parity.)
        """
        z = z.float()
        if not self.transform:
            return z
        # ceil's staircase is floor's mirrored: ceil_g(v) = -floor_g(-v), exactly (negation is exact), so a ceil
        # feature is a floor feature with a negated scale; one branch instead of two and a Where.
        signed = torch.where(ceil, -scale, scale)   # constant: folded at export
        v = z * signed
        down = torch.floor(v)
        return (down + torch.clamp((v - down - (1.0 - self.ramp)) / self.ramp, 0.0, 1.0)) / signed

    def probe(self, k: int, i: int, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"probe_{k}_{i}")(features)

    def _joined(self, prefix: str) -> torch.Tensor:
        """The per-site buffers ``<prefix><i>`` as one vector over every site's features."""
        return torch.cat([getattr(self, f"{prefix}{i}") for i in range(len(self.dims))])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        activations, logits = (inputs[:-1], inputs[-1]) if self.output_probe else (inputs, None)
        # Every site at once (one standardisation and one g over the joined features instead of one per site:
        # fewer, larger graph nodes; onnxruntime folds the joined buffers into constants).
        reduced = self.reduce_joined(activations)
        z = (reduced - self._joined("mean_").double()) / self._joined("std_").double()
        return self.from_joined(z, logits)

    def _poolable(self, i: int, activation: torch.Tensor) -> bool:
        return (self.spatial[i] and self.reduce_mode == "mean" and not self.channels_last[i]
                and activation.dim() == 4 and self.rows[i] == "avgpool")

    def reduce_joined(self, activations) -> torch.Tensor:
        """Every site's reduced features joined, ``[N, sum(dims)]`` float64: the same numbers as :meth:`reduce`
        site by site, but consecutive sites of one shape whose row means are average pools (a ResNet stage's)
        share one cast and one float64 mean: the pools' outputs are joined along the channels first (each
        channel's mean reads its own rows only), and a 1 x 1 map is its own mean.  onnxruntime's cost per node
        dominated these reductions on a ResNet-18 (17 sites, 4 to 5 nodes each)."""
        out, i = [], 0
        while i < len(activations):
            a = activations[i]
            if not self._poolable(i, a):
                out.append(self.reduce(i, a))
                i += 1
                continue
            j = i + 1
            while j < len(activations) and self._poolable(j, activations[j]) and activations[j].shape[2:] == a.shape[2:]:
                j += 1
            group = activations[i:j]
            if a.shape[2] * a.shape[3] == 1:
                out.append(torch.cat(group, dim=1).flatten(1).double())
            else:
                rows = torch.cat([nn.functional.avg_pool2d(g, (1, g.shape[-1])) for g in group], dim=1)
                out.append(rows.double().flatten(2).mean(dim=2))
            i = j
        return torch.cat(out, dim=1)

    def from_standardised(self, z: list[torch.Tensor], logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_joined(torch.cat(z, dim=1), logits)

    def from_joined(self, z: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Joined standardised features [N, sum(dims)] -> the head output."""
        bounds = np.cumsum([0] + self.dims).tolist()
        parts = []
        for k in range(self.sets):
            if self.transform:
                gz = self.staircase(z, self._joined(f"scale_{k}_"), self._joined(f"ceil_{k}_"))
            else:
                gz = z.float()  # the same rounding as the staircase's
            if self.value:
                parts.append(gz)
            if self.provenance:
                parts += [torch.softmax(self.probe(k, i, gz[:, bounds[i] : bounds[i + 1]]), dim=1)
                          for i in range(len(self.dims))]
                if self.output_probe:
                    parts.append(torch.softmax(logits.float(), dim=1))
        return torch.cat(parts, dim=1)


def layout(config: dict[str, Any]) -> list[dict[str, list[tuple[int, int]]]]:
    """Column ranges of the head output, per set: ``value`` per site and ``probe`` per site."""
    dims, c = [int(d) for d in config["dims"]], int(config["num_classes"])
    out, offset = [], 0
    for _ in range(int(config["sets"])):
        entry: dict[str, list[tuple[int, int]]] = {"value": [], "probe": []}
        if config["value"]:
            for d in dims:
                entry["value"].append((offset, offset + d))
                offset += d
        if config["provenance"]:
            for _ in range(len(dims) + int(bool(config.get("output_probe", False)))):
                entry["probe"].append((offset, offset + c))
                offset += c
        out.append(entry)
    return out


def feature_width(config: dict[str, Any]) -> int:
    ranges = [r for entry in layout(config) for kind in entry.values() for r in kind]
    return max((b for _, b in ranges), default=0)


# --------------------------------------------------------------------------- detector


class NICDetector:
    """Python side (scikit-learn) of the composite detector; ``onnx_model`` is the same computation in ONNX."""

    def __init__(self, name: str, n_features: int, sets: list, vote: int | None):
        self.method_name = name
        self.n_features = int(n_features)
        self.sets = sets            # list of harden.detectors.nic_onnx.SetSpec
        self.vote = vote
        self._onnx: bytes | None = None

    @staticmethod
    def _decision(estimator, x: np.ndarray) -> np.ndarray:
        return np.asarray(estimator.decision_function(np.asarray(x, dtype=np.float32)), dtype=np.float64).reshape(-1)

    def set_scores(self, features: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """[N, K] per-set scores (normalised when there is a vote) and each set's [N, parts] invariant scores."""
        features = np.asarray(features, dtype=np.float32)
        per_set, invariants = [], []
        for spec in self.sets:
            inv = np.stack([p.sign * self._decision(p.estimator, features[:, p.start : p.stop]) for p in spec.parts], 1)
            inv = inv.astype(np.float32)
            raw = spec.final_sign * self._decision(spec.final, inv)
            if self.vote is not None:
                raw = (raw - spec.loc) / spec.spread
            per_set.append(raw)
            invariants.append(inv)
        return np.stack(per_set, axis=1), invariants

    def score(self, features: np.ndarray) -> np.ndarray:
        return score_finite_rows(features, self._finite_score)

    def _finite_score(self, features: np.ndarray) -> np.ndarray:
        scores, _ = self.set_scores(features)
        if self.vote is None:
            return scores[:, 0]
        return np.sort(scores, axis=1)[:, scores.shape[1] - self.vote]  # the vote-th largest

    def onnx_model(self) -> bytes:
        if self._onnx is None:
            from harden.detectors.nic_onnx import build_composite

            model = build_composite(f"{self.method_name}.features", f"{self.method_name}.raw", self.n_features,
                                    self.sets, self.vote)
            self._onnx = model.SerializeToString()
        return self._onnx


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class NICOptions(OptionSet):
    # The 8 deepest sites (every site of a smaller model): each site costs a probe, two SVMs and a reduction in the
    # graph; on the ResNet-18 pair every site cost 1.14-1.16x the classifier, the deepest 8 1.07x, at the same
    # detection on both deep suite pairs (docs/results/nic.md, "Which sites").
    layers: str = layers_option("deepest:8")
    detectors: int = option(1, "K randomised detector sets, majority vote", minimum=1)
    invariants: str = option("both", "value | provenance | both", choices=INVARIANTS)
    reduce: str = option(DEFAULT_REDUCE, "conv features per channel: mean | max | meanmax", choices=REDUCTIONS)
    nu: float = option(DEFAULT_NU, "nu of the invariants' one-class SVMs", minimum=0.0, strict=True, maximum=1.0)
    final_nu: float = option(DEFAULT_FINAL_NU, "nu of the final one-class SVM over the invariant scores",
                             minimum=0.0, strict=True, maximum=1.0)
    svm_gamma: float | None = option(None, "absolute RBF gamma of every SVM (default: gamma / number of features)",
                                     minimum=0.0, strict=True)
    gamma: float = option(DEFAULT_GAMMA, "RBF gamma of the invariants' SVMs, times 1 / number of features",
                          minimum=0.0, strict=True)
    final_gamma: float = option(DEFAULT_FINAL_GAMMA, "the final SVM's gamma, times 1 / number of invariants",
                                minimum=0.0, strict=True)
    provenance_gamma: float | None = option(DEFAULT_PROVENANCE_GAMMA, "the provenance SVMs' gamma factor (none: gamma)",
                                            minimum=0.0, strict=True)
    provenance_nu: float | None = option(DEFAULT_PROVENANCE_NU, "the provenance SVMs' nu (none: nu)", minimum=0.0,
                                         strict=True, maximum=1.0)
    max_train: int = option(DEFAULT_MAX_TRAIN, "cap on training rows per one-class SVM", minimum=10)
    holdout: float = option(DEFAULT_HOLDOUT, "fraction of the training split held out to fit the final SVM",
                            minimum=0.0, maximum=0.999)
    ramp: float = option(DEFAULT_RAMP, "width of the keyed transforms' ramps (fraction of a step)", minimum=0.0,
                         strict=True, maximum=1.0)
    transform: bool = option(True, "keyed non-differentiable transforms g (random scaling with floor or ceil)")
    rounding_headroom: float = option(DEFAULT_ROUNDING_HEADROOM, "a feature's standardising spread is at least this "
                                                                 "many times its float32 rounding (0: its spread "
                                                                 "alone)", minimum=0.0)
    output_probe: bool = option(DEFAULT_OUTPUT_PROBE, "the classifier's softmax is the last derived model of the "
                                                      "provenance chain")

    def gamma_for(self, n_features: int, provenance: bool = False) -> float:
        if self.svm_gamma is not None:
            return self.svm_gamma
        factor = self.provenance_gamma if provenance and self.provenance_gamma is not None else self.gamma
        return factor / max(1, n_features)

    def nu_for(self, provenance: bool = False) -> float:
        return self.provenance_nu if provenance and self.provenance_nu is not None else self.nu


def _one_class(nu: float, gamma: float):
    from sklearn.svm import OneClassSVM

    return OneClassSVM(kernel="rbf", nu=nu, gamma=gamma, cache_size=500)


PROBE_CHUNK = 4096   # rows per partial gradient of a probe (the unit split across ranks)


def _train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 200,
                 weight_decay: float = 1e-4) -> nn.Linear:
    """Multinomial logistic regression: cross-entropy + a small L2 penalty, minimised by L-BFGS from zero weights.

    Written in NumPy/SciPy (float64, single-threaded): the problem is tiny, and torch's thread pool made each of
    the few hundred small steps cost more in synchronisation than in arithmetic on a shared CPU.
    """
    from scipy.optimize import minimize

    xs = np.asarray(x, dtype=np.float64)
    n, d = xs.shape
    xb = np.concatenate([xs, np.ones((n, 1))], axis=1)
    onehot = np.eye(num_classes)[np.asarray(y)]
    penalty = np.ones((d + 1, 1))
    penalty[-1] = 0.0  # no penalty on the bias

    def loss_grad(flat):
        w = flat.reshape(d + 1, num_classes)

        def part(rows: slice):   # a chunk's cross-entropy sum and its gradient
            logits = xb[rows] @ w
            logits -= logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            return -(onehot[rows] * log_p).sum(), xb[rows].T @ (np.exp(log_p) - onehot[rows])

        # Data parallel under torchrun: each rank sums its chunks, every rank gets every chunk's sum (in order),
        # so every rank takes the same L-BFGS step as one process would.
        parts = map_chunks(n, PROBE_CHUNK, part)
        loss = sum(p[0] for p in parts) / n + weight_decay * (penalty * w * w).sum()
        grad = sum(p[1] for p in parts) / n + 2 * weight_decay * penalty * w
        return loss, grad.reshape(-1)

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        result = minimize(loss_grad, np.zeros((d + 1) * num_classes), jac=True, method="L-BFGS-B",
                          options={"maxiter": steps})
    w = result.x.reshape(d + 1, num_classes)
    probe = nn.Linear(d, num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.from_numpy(w[:-1].T.astype(np.float32)))
        probe.bias.copy_(torch.from_numpy(w[-1].astype(np.float32)))
    return probe.eval().requires_grad_(False)


@torch.no_grad()
def _site_activations(gm, chosen: list[str], x: torch.Tensor, head: NICHead,
                      batch_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reduced (not yet standardised) features per site, and the classifier's logits."""
    extractor = feature_extractor(gm, chosen)
    parts: list[list[torch.Tensor]] = [[] for _ in chosen]
    logits = []
    for chunk in batches(x, batch_size):
        out, *acts = extractor(chunk)
        logits.append(out)
        for i, a in enumerate(acts):
            parts[i].append(head.reduce(i, a))
    return [torch.cat(p) for p in parts], torch.cat(logits)


@torch.no_grad()
def _feature_rounding(gm, chosen: list[str], x: torch.Tensor, head: NICHead) -> list[torch.Tensor] | None:
    """Per site and feature: max over ``x`` of |reduced feature of the float32 classifier - of the float64 one|,
    or None for a classifier that will not run in float64 (one that casts to float32 itself)."""
    import copy

    try:
        wide, _ = _site_activations(copy.deepcopy(gm).double(), chosen, x.double(), head)
    except (RuntimeError, TypeError):
        return None
    narrow, _ = _site_activations(gm, chosen, x, head)
    return [(a - b).abs().amax(dim=0) for a, b in zip(narrow, wide)]


def _draw_transform(key: str, k: int, dims: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(key_seed(key, f"nic:{k}"))
    lo, hi = SCALE_RANGE
    out = []
    for d in dims:
        scale = lo + (hi - lo) * torch.rand(d, generator=generator)
        ceil = torch.rand(d, generator=generator) < 0.5
        out.append((scale, ceil))
    return out


@register_method
class NIC(Method):
    """Value + provenance invariants (one-class SVMs on benign data), a final one-class SVM; K randomised sets."""

    name = "nic"
    option_set = NICOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        started = time.perf_counter()
        settings = ctx.settings
        site_nodes = graph_sites(ctx.gm)
        paths = {n.name: module_path(n) for n in site_nodes}
        chosen = select_sites([n.name for n in site_nodes], paths, settings.layers)
        value = settings.invariants in ("value", "both")
        n_probes = len(chosen) + int(settings.output_probe)
        provenance = settings.invariants in ("provenance", "both") and n_probes >= 2
        if settings.invariants == "provenance" and not provenance:
            raise HardenError("NIC provenance invariants need at least two derived models (pairs of consecutive "
                              "sites, the classifier's output counting as the last one)")

        train = ctx.data.train
        infos = {i.name: i for i in describe(ctx.gm, train.x[:2])}
        with torch.no_grad():
            num_classes = int(ctx.gm(train.x[:2]).shape[1])
        if int(train.y.max()) >= num_classes:
            raise HardenError(f"labels go up to {int(train.y.max())} but the model has {num_classes} outputs")
        spatial = [len(infos[s].shape) > 1 for s in chosen]
        nodes = {n.name: n for n in site_nodes}
        last = [sp and channels_last(ctx.gm, nodes[s]) for s, sp in zip(chosen, spatial)]
        channels = [int(infos[s].shape[-1 if cl else 0]) if sp else int(np.prod(infos[s].shape))
                    for s, sp, cl in zip(chosen, spatial, last)]
        rows = ["avgpool" if c % ROW_BLOCK == 0 else "sum" for c in channels]
        dims = [c * (2 if sp and settings.reduce == "meanmax" else 1) for c, sp in zip(channels, spatial)]
        config: dict[str, Any] = {
            "sites": chosen, "dims": dims, "spatial": spatial, "channels_last": last, "reduce": settings.reduce,
            "rows": rows, "sets": settings.detectors,
            "num_classes": num_classes, "value": value, "provenance": provenance, "transform": settings.transform,
            "ramp": settings.ramp, "scale_range": list(SCALE_RANGE), "output_probe": provenance and settings.output_probe,
        }
        head = NICHead(config)

        # Which training rows fit the invariants (A) and which are held out to fit the final SVM (B).
        rng = np.random.default_rng(key_seed(ctx.options.key, "nic:split"))
        order = rng.permutation(len(train))
        n_b = int(round(settings.holdout * len(order)))
        rows_a = order[n_b:][: settings.max_train]
        rows_b = order[:n_b][: settings.max_train] if n_b >= 10 else rows_a

        ctx.progress("nic: site features", 0.05)
        reduced, logits = _site_activations(ctx.gm, chosen, train.x, head)
        rounding = (_feature_rounding(ctx.gm, chosen, train.x[rows_a[:ROUNDING_ROWS]], head)
                    if settings.rounding_headroom > 0 else None)
        for i, r in enumerate(reduced):
            getattr(head, f"mean_{i}").copy_(r[rows_a].mean(0))
            std = r[rows_a].std(0)
            if rounding is not None:
                std = torch.maximum(std, settings.rounding_headroom * rounding[i])
            getattr(head, f"std_{i}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        z = [(r - getattr(head, f"mean_{i}")) / getattr(head, f"std_{i}") for i, r in enumerate(reduced)]

        probe_accuracy: list[list[float]] = []
        for k in range(settings.detectors):
            if settings.transform:
                for i, (scale, ceil) in enumerate(_draw_transform(ctx.options.key, k, dims)):
                    getattr(head, f"scale_{k}_{i}").copy_(scale)
                    getattr(head, f"ceil_{k}_{i}").copy_(ceil)
            if provenance:
                accs = []
                y_a = train.y[rows_a]
                for i, zi in enumerate(z):
                    with torch.no_grad():
                        gz = head.g(k, i, zi)
                    probe = _train_probe(gz[rows_a], y_a, num_classes)
                    getattr(head, f"probe_{k}_{i}").load_state_dict(probe.state_dict())
                    with torch.no_grad():
                        held = rows_b if len(rows_b) and rows_b is not rows_a else rows_a
                        accs.append(float((probe(gz[held]).argmax(1) == train.y[held]).float().mean()))
                probe_accuracy.append(accs)
            ctx.progress("nic: probes", 0.1 + 0.2 * (k + 1) / settings.detectors)

        with torch.no_grad():
            features = head.eval().from_standardised(z, logits).numpy().astype(np.float32)
        n_features = features.shape[1]

        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from harden.detectors.nic_onnx import Part, SetSpec

        sets = []
        ranges = layout(config)
        for k, entry in enumerate(ranges):
            parts = [Part(None, a, b) for a, b in entry["value"]]
            n_value = len(parts)
            probes = entry["probe"]
            parts += [Part(None, probes[i][0], probes[i + 1][1]) for i in range(len(probes) - 1)]
            for j, part in enumerate(parts):
                x_a = features[rows_a, part.start : part.stop]
                is_provenance = j >= n_value
                svm = _one_class(settings.nu_for(is_provenance), settings.gamma_for(part.stop - part.start, is_provenance))
                # Value features are standardised in the head; the probes' softmaxes are standardised here.
                part.estimator = (svm if j < n_value else make_pipeline(StandardScaler(), svm)).fit(x_a)
                ctx.progress("nic: invariants", 0.3 + 0.6 * (k + (j + 1) / len(parts)) / settings.detectors)
            inv_b = np.stack([-NICDetector._decision(p.estimator, features[rows_b, p.start : p.stop]) for p in parts], 1)
            inv_b = inv_b.astype(np.float32)
            final = make_pipeline(StandardScaler(), _one_class(settings.final_nu, settings.final_gamma / len(parts)))
            final.fit(inv_b)
            spec = SetSpec(parts, final)
            if settings.detectors > 1:
                # Majority vote as one raw score: each set's score is normalised so that 0 sits at its own
                # (1 - fpr) quantile on the held-out benign rows and one unit is its (1 - fpr) quantile minus its
                # median.  The raw score is the m-th largest of the K normalised scores, m = K // 2 + 1 (the median
                # for odd K).  "m-th largest > t" <=> "at least m sets are above t", so the threshold t that
                # calibration sets on this score IS a majority vote of the K sets at the per-set thresholds
                # loc_k + t * spread_k, which sit at about the same benign quantile for every set.
                raw_b = -NICDetector._decision(final, inv_b)
                q_hi = float(np.quantile(raw_b, 1.0 - ctx.options.fpr))
                spread = q_hi - float(np.median(raw_b))
                spec.loc, spec.spread = q_hi, spread if spread > 1e-9 else 1.0
            sets.append(spec)
        vote = settings.detectors // 2 + 1 if settings.detectors > 1 else None
        detector = NICDetector(self.name, n_features, sets, vote)

        config.update({
            "nu": settings.nu, "final_nu": settings.final_nu,
            "gamma": settings.svm_gamma if settings.svm_gamma is not None else f"{settings.gamma:g}/n_features",
            "final_gamma": f"{settings.final_gamma:g}/n_invariants",
            "provenance_nu": settings.nu_for(provenance=True),
            "provenance_gamma": (settings.svm_gamma if settings.svm_gamma is not None else
                                 f"{settings.gamma if settings.provenance_gamma is None else settings.provenance_gamma:g}/n_features"),
            "invariants": settings.invariants, "vote": vote, "n_features": n_features,
            "parts_per_set": [len(s.parts) for s in sets],
            "probe_accuracy": probe_accuracy, "train_rows": [int(len(rows_a)), int(len(rows_b))],
            "key_fingerprint": key_fingerprint(ctx.options.key),
            "fit_seconds": round(time.perf_counter() - started, 2),
        })
        head_inputs = list(chosen) + ([LOGITS] if config["output_probe"] else [])
        return FittedMethod(self.name, config, head.eval().requires_grad_(False), head_inputs, detector,
                            sites=list(chosen))

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        return NICHead(config)
