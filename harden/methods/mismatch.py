"""Bi-model decision mismatch (paper 003): a second, structurally different model beside the classifier.

Both models receive the SAME input tensor (the classifier's input node, in
``--input-range``; nothing is re-normalised for the second model).  The head
returns ``concat(softmax(classifier logits), softmax(second model logits))``
``[N, 2K]`` float32; an RBF SVC (StandardScaler + SVC pipeline, exported as
float64 ONNX algebra by :mod:`harden.detectors.dense_rbf`, as SafetyNet's is)
trained on natural (0) versus adversarial (1) training examples turns it into a
raw score (its decision function, higher = more suspicious).
Each adversarial example is made by an attack against ONE of the two models,
chosen at random (seeded by the key), as in the paper.  The default attacks
are ``fgsm:eps=auto``, ``pgd:eps=auto`` and the ``saltpepper`` degradation;
``eps=auto`` is the eps at which FGSM halves the CLASSIFIER's accuracy,
measured once per fit on a seeded subset of at most 500 training inputs
(:func:`harden.attacks.strength.resolve_auto_eps`); the resolved attacks and
those strength facts are in the config.

The second model is either

* ``second_model`` (``--second-model PATH`` [``--second-arch``]): loaded with
  :func:`harden.io.model.load_model`, traced, and stored in the method config as
  a harden graph document (:func:`harden.graph.graphfile.graph_to_json`, JSON,
  nothing pickled); its weights travel in the head's state_dict; or
* ``train_second`` (``--train-second``), the default when no second model is
  given: harden trains one on the training split, seeded by the key. An MLP
  (the paper's 320-50 hidden units) when the input has at most
  :data:`SMALL_INPUT` values, else a small 3x3 CNN; whichever of the two has a
  layer sequence different from the classifier's.

"Structurally different" means the sequence of layer kinds (conv, linear,
pooling, normalisation, activation, ...; widths ignored) differs from the
classifier's: a second model with the classifier's layer sequence is refused.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import time
from pathlib import Path
from typing import Any

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.attacks.degradations import DEGRADATIONS, degrade  # noqa: F401  (re-exported: the method trains on them)
from harden.core.options import OptionSet, option
from harden.errors import HardenError
from harden.methods.base import (
    INPUT,
    LOGITS,
    FitContext,
    FittedMethod,
    Method,
    key_fingerprint,
    key_seed,
    register_method,
)

# An input with at most this many values (C*H*W; MNIST has 784) gets an MLP second model, else a CNN.
SMALL_INPUT = 1024
MLP_HIDDEN = (320, 50)       # the paper's MNIST MLP
MLP_DROPOUT = 0.5            # the paper's; on MNIST it lifts the MLP's test accuracy from ~93% to ~94%
CNN_CHANNELS = (16, 32)      # conv3x3(c1)-conv3x3(c1)-pool-conv3x3(c2)-pool-linear
SECOND_EPOCHS = 60           # at most; the epoch with the best held-out accuracy is kept
SECOND_PATIENCE = 10
SECOND_HOLDOUT = 0.1         # of the training split, to choose the epoch
SECOND_LR = 1e-3
SECOND_BATCH = 64
# How the second model is trained (``second_recipe``): "fgsm" doubles each batch with FGSM examples against the
# model itself, at eps ``second_eps``; "plain" is the paper's clean training.  Chosen by
# measurement (bench/experiments/mismatch_second.py): on MNIST it raised the share of the classifier's successful
# FGSM/BIM/PGD/DeepFool/CW examples on which the second model disagrees from 0.39-0.83 to 0.79-0.90, and lowered
# clean disagreement from 5.5% to 4.1%.
SECOND_RECIPES = ("fgsm", "plain", "transfer")
DEFAULT_SECOND_RECIPE = "fgsm"
# ``second_eps``: "auto" is SECOND_EPS_FRACTION x the classifier's half-accuracy eps (harden.attacks.strength), the
# scale of the default training attacks.  It was a fixed 0.1 of the input range (the MNIST measurement above, where
# the half-accuracy eps is 0.15): on the suite's 32x32 colour pair (half-accuracy eps 0.0075-0.01) training at 0.1,
# and at the full 0.01, left the second model at chance (8.6-9.5% held-out accuracy), and its near-constant softmax
# made the detector a float-noise amplifier; at 0.004 it learned as well as plain training (39% test accuracy).
# Where the fgsm recipe still fails (below SECOND_MIN_OVER_CHANCE), the second model is retrained plain.
DEFAULT_SECOND_EPS = "auto"
SECOND_EPS_FRACTION = 0.5
# A trained second model below this multiple of chance (1 / classes) on its held-out tenth is retrained plain, and
# refused if still below: its softmax says nothing about the input, and the detector would learn noise.
SECOND_MIN_OVER_CHANCE = 2.0
# A user's second model below this fraction of the classifier's training accuracy is refused (it does not read
# the inputs as it was trained to).
USER_SECOND_MIN_RATIO = 0.5
# StandardScaler divides by each feature's spread; a softmax column that barely varies (a class one model never
# predicts) would turn float32 rounding (1e-7..1e-6, torch against onnxruntime) into whole standard deviations.
SCALE_FLOOR = 1e-3

# Detector defaults, chosen by measurement across FGSM, BIM, PGD, DeepFool and CW on LeNet-5 / MNIST with the
# candidates' adversarial examples made on the CALIBRATION split (never the test split results are reported on);
# see docs/results/mismatch.md and bench/experiments/mismatch_select.py.
# Those measurements trained at eps = 0.1 of the input range, a budget chosen on MNIST; the default budget is now
# eps=auto, the eps at which FGSM halves THIS classifier's accuracy (harden.attacks.strength), found per fit on the
# training split, since one fixed fraction is far too large for some models (32x32 colour) and small for others.  "saltpepper" is a
# quality degradation (see degrade()), not an ART attack: training on it made the detector generalise to noise and
# blur too.
DEFAULT_ATTACKS = ("fgsm:eps=auto", "pgd:eps=auto", "saltpepper")
DEFAULT_MAX_TRAIN = 3000     # detector training rows (natural + adversarial); the SVC's cost grows with them
# The grid of docs/results/mismatch.md.  (It stopped at C=10 when the SVC ran as skl2onnx's float32 operator, whose
# error grows with C; the float64 graph of harden.detectors.dense_rbf has no such limit, but the grid was not
# re-measured with C=100.)
C_GRID = (0.1, 1.0, 10.0)
GAMMA_FACTORS = (0.25, 1.0, 4.0)  # gamma = factor / n_features on standardised features (1.0 is sklearn's 'scale')
CV_FOLDS = 3
CV_MAX_FPR = 0.1             # grid scored by the standardised partial ROC-AUC up to this FPR (the operating region)

# Layer kinds that make up a model's "structure"; shape-only ops (flatten, reshape, identity, dropout) do not count.
_SHAPE_ONLY = frozenset({"identity", "reshape", "flatten", "permute", "transpose", "contiguous", "size", "getitem",
                         "getattr"})


# --------------------------------------------------------------------------- second models


def _mlp(spec: dict) -> nn.Module:
    c, h, w = spec["input_shape"]
    sizes = [c * h * w, *spec["hidden"], spec["num_classes"]]
    dropout = float(spec.get("dropout", 0.0))
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))  # training only: identity in eval mode and in ONNX
    return nn.Sequential(*layers)


def _cnn(spec: dict) -> nn.Module:
    c, h, w = spec["input_shape"]
    c1, c2 = spec["channels"]
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), spec["num_classes"]),
    )


def _placeholder_arrays(doc: dict) -> dict[str, np.ndarray]:
    """Zero arrays of every tensor a graph document names (the real values come from the head's state_dict)."""
    from harden.core.limits import MAX_TOTAL_ELEMENTS, check_elements

    arrays: dict[str, np.ndarray] = {}
    total = 0

    def visit(module: Any, prefix: str) -> None:
        nonlocal total
        if not isinstance(module, dict) or "same_as" in module:
            return
        for group in ("parameters", "buffers", "tensor_attributes"):
            for name, entry in module.get(group, []):
                if isinstance(entry, dict) and "dtype" in entry:
                    dtype = getattr(torch, entry.get("bits", entry["dtype"]), None) \
                        if isinstance(entry.get("bits", entry["dtype"]), str) else None
                    if not isinstance(dtype, torch.dtype):
                        raise HardenError(f"mismatch: unknown dtype {entry['dtype']!r} in the second model's graph")
                    # a bundle's graph states these shapes: capped before numpy allocates them
                    total += check_elements(entry.get("shape"), f"mismatch: second model tensor {prefix + name!r}")
                    if total > MAX_TOTAL_ELEMENTS:
                        raise HardenError(f"mismatch: the second model's tensors exceed {MAX_TOTAL_ELEMENTS:,} elements")
                    arrays[prefix + name] = np.zeros(entry["shape"], dtype=torch.empty(0, dtype=dtype, device="cpu").numpy().dtype)
        for name, child in module.get("children", []):
            visit(child, f"{prefix}{name}.")

    visit(doc.get("root"), "")
    return arrays


def _encode_array(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def build_second(spec: dict) -> nn.Module:
    """The second model's architecture from its JSON spec (weights zero or random until the state_dict loads)."""
    kind = spec.get("kind")
    if kind == "mlp":
        return _mlp(spec)
    if kind == "cnn":
        return _cnn(spec)
    if kind == "graph":
        from harden.graph.graphfile import graph_from_json

        arrays = _placeholder_arrays(spec["graph"])
        # Tensors outside the state_dict (non-persistent buffers, plain tensor attributes) travel in the config.
        arrays.update({k: _decode_array(v) for k, v in spec.get("constants", {}).items()})
        return graph_from_json(spec["graph"], arrays)
    raise HardenError(f"mismatch: unknown second model kind {kind!r} (mlp, cnn or graph)")


def layer_sequence(model: nn.Module) -> list[str]:
    """The model's layer kinds in graph order (canonical ops; shape-only ops left out)."""
    from harden.graph.ops import canonical_op, op_spelling
    from harden.graph.trace import trace

    gm = model if isinstance(model, fx.GraphModule) else trace(copy.deepcopy(model))
    kinds = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        key = canonical_op(gm, node)
        if key in _SHAPE_ONLY:
            continue
        if key is None:
            spelling = op_spelling(gm, node)
            if node.op != "call_module" or "getattr" in spelling:
                continue  # size/getattr/getitem bookkeeping of symbolic tracing
            key = spelling
        kinds.append(key)
    return kinds


def _compact(kinds: list[str]) -> str:
    text = " ".join(kinds)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- head


class MismatchHead(nn.Module):
    """(input, logits) -> concat(softmax(logits), softmax(second(input))) [N, 2K] float32.

    Rows whose values are not finite (a NaN or inf input) give zero features:
    the policy raises the alarm on such rows anyway, and scikit-learn refuses NaN.
    """

    def __init__(self, second: nn.Module):
        super().__init__()
        self.second = second

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        first = torch.softmax(logits.float(), dim=1)
        other = torch.softmax(self.second(x).float(), dim=1)
        features = torch.cat([first, other], dim=1)
        return torch.where(torch.isfinite(features), features, torch.zeros_like(features))


# --------------------------------------------------------------------------- fitting helpers


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).argmax(1)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_predict(model, x) == y).float().mean()) if len(y) else float("nan")


def _fgsm_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float) -> torch.Tensor:
    """One FGSM step against ``model`` in eval mode (dropout does not blur the gradient); its mode is restored."""
    was = model.training
    model.eval()
    with torch.enable_grad():
        adv = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
    model.train(was)
    return (x + eps * grad.sign()).clamp(lo, hi).detach()


def _train_second(spec: dict, x: torch.Tensor, y: torch.Tensor, seed: int, device: str, progress, *,
                  recipe: str = DEFAULT_SECOND_RECIPE, input_range: tuple[float, float] = (0.0, 1.0),
                  classifier: nn.Module | None = None, eps: float | None = None) -> tuple[nn.Module, dict]:
    """Adam on the training split minus a held-out tenth; the epoch with the best held-out accuracy is kept.

    ``recipe`` "fgsm": every batch is doubled with its FGSM examples against the model itself (``eps`` in input
    units), which made the second model disagree with the classifier on far more of
    the classifier's adversarial examples, for every attack measured (docs/results/mismatch.md); "plain": clean
    batches only, as in the paper; "transfer": doubled with FGSM examples against the CLASSIFIER (true labels),
    which makes the second model right where the classifier's L-inf gradient attacks fool it (opt-in: it is the
    threat model's own attack, it raises natural disagreement and it helped less against CW and degradations).
    """
    if recipe not in SECOND_RECIPES:
        raise HardenError(f"second_recipe {recipe!r} is not one of {', '.join(SECOND_RECIPES)}")
    if recipe == "transfer" and classifier is None:
        raise HardenError("second_recipe 'transfer' needs the classifier")
    if recipe != "plain" and eps is None:
        raise ValueError(f"second_recipe {recipe!r} needs an FGSM eps")
    lo, hi = float(input_range[0]), float(input_range[1])
    if recipe == "transfer" and device != "cpu":
        classifier = copy.deepcopy(classifier).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_second(spec).to(device)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=generator)
        n_hold = max(1, int(round(SECOND_HOLDOUT * len(x)))) if len(x) >= 20 else 0
        hold, fit = order[:n_hold], order[n_hold:]
        x_fit, y_fit = x[fit].to(device), y[fit].to(device)
        opt = torch.optim.Adam(model.parameters(), lr=SECOND_LR)
        best_state, best_acc, best_epoch, stale = None, -1.0, 0, 0
        for epoch in range(SECOND_EPOCHS):
            model.train()
            perm = torch.randperm(len(x_fit), generator=generator)
            for start in range(0, len(perm), SECOND_BATCH):
                idx = perm[start : start + SECOND_BATCH].to(device)
                xb, yb = x_fit[idx], y_fit[idx]
                if recipe != "plain":
                    target = classifier if recipe == "transfer" else model
                    xb = torch.cat([xb, _fgsm_batch(target, xb, yb, eps, lo, hi)])
                    yb = torch.cat([yb, yb])
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            model.eval()
            acc = _accuracy(model, x[hold].to(device), y[hold].to(device)) if n_hold else float(epoch)
            if acc > best_acc:
                best_state, best_acc, best_epoch, stale = copy.deepcopy(model.state_dict()), acc, epoch + 1, 0
            else:
                stale += 1
            progress(f"mismatch: training the second model (epoch {epoch + 1})", 0.05 + 0.25 * (epoch + 1) / SECOND_EPOCHS)
            if stale >= SECOND_PATIENCE:
                break
        model.load_state_dict(best_state)
    model = model.cpu().eval().requires_grad_(False)
    facts = {"recipe": recipe, "epochs": best_epoch, "holdout_accuracy": round(best_acc, 4) if n_hold else None,
             "optimiser": f"Adam lr={SECOND_LR} batch={SECOND_BATCH}"}
    if recipe != "plain":
        facts["fgsm_eps"] = round(eps, 6)
    return model, facts


def _second_eps(ctx: FitContext, strength) -> tuple[float, Any]:
    """(FGSM eps of the second model's training, in input units; the AttackStrength, computed if needed)."""
    from harden.attacks.strength import resolve_auto_eps

    value = ctx.settings.second_eps
    if value != "auto":
        return float(value), strength
    if strength is None:
        _, strength = resolve_auto_eps(["fgsm:eps=auto"], ctx.gm, ctx.data.train.x, ctx.data.train.y,
                                       input_range=ctx.data.input_range, num_classes=ctx.data.num_classes,
                                       seed=key_seed(ctx.options.key, f"mismatch:auto-eps:{ctx.options.seed}"))
    return SECOND_EPS_FRACTION * float(strength.eps), strength


def _learned_enough(training: dict, num_classes: int) -> bool:
    held = training["holdout_accuracy"]
    return held is None or held >= SECOND_MIN_OVER_CHANCE / num_classes


def _check_trained_second(training: dict, num_classes: int) -> None:
    """Refuse a trained second model that learned next to nothing."""
    if not _learned_enough(training, num_classes):
        raise HardenError(
            f"mismatch: the second model harden trained reaches {training['holdout_accuracy']:.1%} on held-out "
            f"training inputs (chance is {1 / num_classes:.1%}), too little to compare with; give one with "
            "--second-model")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _user_second(path: str, arch: str | None, trust_pickle: bool) -> tuple[nn.Module, dict]:
    """The user's second model as a traced GraphModule and its JSON spec (graph document + constants)."""
    from harden.graph.trace import trace
    from harden.io.model import load_model

    model = load_model(path, arch, trust_pickle)
    try:
        gm = trace(model)
        spec = graph_spec(gm)
    except HardenError as exc:
        raise HardenError(f"--second-model {path}: {exc}") from None
    return gm, spec


def graph_spec(gm: fx.GraphModule) -> dict:
    """A traced second model as JSON: its graph document, plus the tensors its state_dict does not carry."""
    from harden.graph.graphfile import graph_to_json

    doc, arrays = graph_to_json(gm)
    in_state = set(gm.state_dict())
    constants = {k: _encode_array(v) for k, v in arrays.items() if k not in in_state}
    return {"kind": "graph", "graph": doc, "constants": constants}


def _check_fits(second: nn.Module, example: torch.Tensor, num_classes: int, what: str) -> None:
    if isinstance(second, fx.GraphModule):   # a graph from a file: no tensor above the caps before it runs
        from harden.graph.sizes import check_sizes

        check_sizes(second, tuple(example.shape), what)
    try:
        with torch.no_grad():
            out = second(example)
    except Exception as exc:  # noqa: BLE001 - any failure means the input does not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HardenError(f"{what} does not accept the data's input shape {tuple(example.shape[1:])}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise HardenError(f"{what} must return logits [N, K]; it returns shape {tuple(getattr(out, 'shape', ()))}")
    if out.shape[1] != num_classes:
        raise HardenError(f"{what} has {out.shape[1]} outputs; the classifier has {num_classes} classes")


def _check_structure(primary: list[str], second: list[str], what: str) -> None:
    if primary == second:
        raise HardenError(
            f"{what} has the classifier's layer sequence ({_compact(second)}); decision mismatch needs a "
            "structurally different second model (other layer kinds or depth), or use --train-second"
        )


def _candidate_specs(input_shape: tuple[int, int, int], num_classes: int) -> list[dict]:
    c, h, w = input_shape
    mlp = {"kind": "mlp", "input_shape": [c, h, w], "hidden": list(MLP_HIDDEN), "dropout": MLP_DROPOUT,
           "num_classes": num_classes}
    cnn = {"kind": "cnn", "input_shape": [c, h, w], "channels": list(CNN_CHANNELS), "num_classes": num_classes}
    if h < 4 or w < 4:
        return [mlp]
    return [mlp, cnn] if c * h * w <= SMALL_INPUT else [cnn, mlp]


class Degradation:
    """A quality degradation used as a training 'attack' (paper section III-A); label() like an AttackSpec."""

    def __init__(self, name: str):
        self.name = name

    def label(self) -> str:
        return self.name


def _parse_attacks(ctx: FitContext):
    """(attack specs and degradations, AttackStrength or None): ``eps=auto`` resolved on the classifier, once, on a
    seeded subset of the training split."""
    from harden.attacks.strength import resolve_auto_eps
    from harden.attacks.catalog import parse_attack

    options, data = ctx.options, ctx.data
    attacks = list(ctx.settings.attacks)
    attacks, strength = resolve_auto_eps(attacks, ctx.gm, data.train.x, data.train.y, input_range=data.input_range,
                                         num_classes=data.num_classes,
                                         seed=key_seed(options.key, f"mismatch:auto-eps:{options.seed}"))
    specs = [Degradation(a.strip().lower()) if a.strip().lower() in DEGRADATIONS else parse_attack(a) for a in attacks]
    return specs, strength


@torch.no_grad()
def _features(head: MismatchHead, primary: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    parts = [head(x[i : i + batch_size], primary(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy().astype(np.float32)


def adversarial_training_set(ctx: FitContext, primary: nn.Module, second: nn.Module, specs: list, max_train: int):
    """Natural and adversarial training inputs, as in the paper: each attacked image is attacked on one model.

    Returns ``(x, label, group, facts)``: label 1 = adversarial; ``group`` is the source image, so that
    cross-validation folds never split an image's natural and adversarial versions.  An adversarial example is
    kept only when the attacked model classified the image correctly and the attack changed its decision
    (the paper puts the natural image back instead: here it is in the natural half already).
    """
    from harden.attacks.catalog import run_attack

    train = ctx.data.train
    rng = np.random.default_rng(key_seed(ctx.options.key, "mismatch:training-set") % 2**63)
    n_images = min(len(train), max(10, max_train // 2))
    rows = np.sort(rng.choice(len(train), n_images, replace=False))
    x, y = train.x[rows], train.y[rows]
    models = (primary, second)
    which_attack = rng.integers(len(specs), size=n_images)
    which_model = rng.integers(2, size=n_images)
    x_adv = x.clone()
    kept = np.zeros(n_images, dtype=bool)
    per_attack: dict[str, dict[str, int]] = {}
    steps = len(specs) * 2
    for a, spec in enumerate(specs):
        for m, model in enumerate(models):
            sel = np.flatnonzero((which_attack == a) & (which_model == m))
            if len(sel) == 0:
                continue
            ctx.progress(f"mismatch: {spec.label()} against the {'classifier' if m == 0 else 'second model'}",
                         0.35 + 0.45 * (a * 2 + m) / steps)
            seed = key_seed(ctx.options.key, f"mismatch:attack:{a}:{m}") % 2**31
            if isinstance(spec, Degradation):
                adv = degrade(model, spec.name, x[sel].numpy(), y[sel].numpy(), seed=seed,
                              input_range=ctx.data.input_range)[0]
            else:
                adv = run_attack(model, spec, x[sel].numpy(), y[sel].numpy(), input_range=ctx.data.input_range,
                                 num_classes=ctx.data.num_classes, seed=seed)
            adv = torch.from_numpy(adv)
            before, after = _predict(model, x[sel]), _predict(model, adv)
            ok = ((before == y[sel]) & (after != y[sel])).numpy()
            x_adv[sel] = adv
            kept[sel] = ok
            entry = per_attack.setdefault(spec.label(), {"attempted": 0, "kept": 0})
            entry["attempted"] += int(len(sel))
            entry["kept"] += int(ok.sum())
    xs = torch.cat([x, x_adv[torch.from_numpy(kept)]])
    labels = np.concatenate([np.zeros(n_images, dtype=np.int64), np.ones(int(kept.sum()), dtype=np.int64)])
    groups = np.concatenate([np.arange(n_images), np.flatnonzero(kept)])
    facts = {"natural": n_images, "adversarial": int(kept.sum()), "per_attack": per_attack,
             "against_classifier": int((kept & (which_model == 0)).sum()),
             "against_second": int((kept & (which_model == 1)).sum())}
    return xs, labels, groups, facts


def floored_scaler():
    """A StandardScaler whose per-feature scale is at least SCALE_FLOOR (an instance of StandardScaler, so the
    dense RBF export folds it like any other)."""
    from sklearn.preprocessing import StandardScaler

    class FlooredScaler(StandardScaler):
        def fit(self, X, y=None, sample_weight=None):
            super().fit(X, y, sample_weight)
            self.scale_ = np.maximum(self.scale_, SCALE_FLOOR)
            return self

    return FlooredScaler()


def fit_svm(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, c: float | None, gamma: float | None,
            seed: int) -> tuple[Any, dict]:
    """Floored StandardScaler + RBF SVC; C and gamma from a grouped 3-fold grid unless both are given."""
    from sklearn.metrics import make_scorer, roc_auc_score
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC

    if len(np.unique(labels)) < 2:
        raise HardenError("mismatch: no attack succeeded on the training split, so there is nothing to learn "
                          "adversarial examples from; choose stronger --attack settings")
    n_features = features.shape[1]
    pipeline = Pipeline([("scale", floored_scaler()), ("svm", SVC(kernel="rbf", cache_size=500))])
    c_grid = [c] if c is not None else list(C_GRID)
    gamma_grid = [gamma] if gamma is not None else [f / n_features for f in GAMMA_FACTORS]
    facts: dict[str, Any] = {}
    if len(c_grid) * len(gamma_grid) > 1:
        rng = np.random.default_rng(seed)
        fold_of_group = rng.integers(CV_FOLDS, size=int(groups.max()) + 1)
        scorer = make_scorer(roc_auc_score, response_method="decision_function", max_fpr=CV_MAX_FPR)
        search = GridSearchCV(pipeline, {"svm__C": c_grid, "svm__gamma": gamma_grid}, scoring=scorer,
                              cv=PredefinedSplit(fold_of_group[groups]), n_jobs=1, refit=True)
        search.fit(features, labels)
        results = search.cv_results_
        order = np.argsort(results["rank_test_score"], kind="stable")
        pipeline = search.best_estimator_
        facts["cv"] = {"folds": CV_FOLDS, "scoring": f"partial ROC-AUC (max FPR {CV_MAX_FPR}, standardised)",
                       "best_score": round(float(results["mean_test_score"][order[0]]), 4),
                       "grid": {"C": c_grid, "gamma": [round(g, 6) for g in gamma_grid]}}
    else:
        pipeline.set_params(svm__C=c_grid[0], svm__gamma=gamma_grid[0]).fit(features, labels)
    svm = pipeline.named_steps["svm"]
    facts.update({"C": float(svm.C), "gamma": float(svm.gamma), "support_vectors": int(svm.support_vectors_.shape[0])})
    return pipeline, facts


# --------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class MismatchOptions(OptionSet):
    second_model: str | None = option(None, "the second model (.pt2, or .pt with second_arch); none: train one")
    second_arch: str | None = option(None, "package.module:factory of second_model's architecture")
    train_second: bool = option(False, "train a structurally different second model (the default when no "
                                       "second_model is given)")
    second_recipe: str = option(DEFAULT_SECOND_RECIPE, "how the trained second model learns: fgsm (batches doubled "
                                                       "with FGSM examples) | plain | transfer", choices=SECOND_RECIPES)
    second_eps: float | str = option(DEFAULT_SECOND_EPS, "FGSM eps of the second model's training (input units); "
                                                         "auto: half the eps at which FGSM halves the classifier's "
                                                         "accuracy", minimum=0.0, strict=True, keywords=("auto",))
    attacks: tuple[str, ...] = option(DEFAULT_ATTACKS, "attacks (and quality degradations) making the adversarial "
                                                       "training examples, against either model at random")
    svm_c: float | None = option(None, "SVC C (default: cross-validated grid)", minimum=0.0, strict=True)
    svm_gamma: float | None = option(None, "RBF gamma (default: cross-validated grid)", minimum=0.0, strict=True)
    max_train: int = option(DEFAULT_MAX_TRAIN, "detector training rows (natural + adversarial)", minimum=20)

    def check(self, owner: str) -> None:
        from harden.attacks.strength import check_training_attacks

        check_training_attacks(self.attacks, owner, extra_names=tuple(DEGRADATIONS))
        if self.second_model and self.train_second:
            raise HardenError(f"{owner}: give either second_model or train_second, not both")
        if self.second_arch and not self.second_model:
            raise HardenError(f"{owner}: second_arch names the architecture of second_model; give second_model too")


@register_method
class Mismatch(Method):
    """Softmax outputs of the classifier and a structurally different second model; an RBF SVC on them."""

    name = "mismatch"
    option_set = MismatchOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        from harden.attacks.strength import auto_eps_facts
        from harden.detectors.dense_rbf import RbfSvmDetector

        started = time.perf_counter()
        options, data = ctx.options, ctx.data
        s = ctx.settings
        c, gamma, max_train = s.svm_c, s.svm_gamma, s.max_train
        path, arch, train_flag = s.second_model, s.second_arch, s.train_second

        example = data.train.x[:2]
        with torch.no_grad():
            num_classes = int(ctx.gm(example).shape[1])
        if num_classes != data.num_classes:
            raise HardenError(f"the classifier has {num_classes} outputs but the data has {data.num_classes} classes")
        ctx.progress("mismatch: attack strength", 0.01)
        specs, strength = _parse_attacks(ctx)
        primary_kinds = layer_sequence(ctx.gm)
        ctx.progress("mismatch: second model", 0.02)

        if path:
            second, spec = _user_second(str(path), arch, options.trust_pickle)
            what = f"the second model {Path(path).name}"
            _check_fits(second, example, num_classes, what)
            kinds = layer_sequence(second)
            _check_structure(primary_kinds, kinds, what)
            source = {"from": "file", "file": Path(path).name, "sha256": _file_sha256(Path(path)), "arch": arch}
            training = None
        else:
            candidates = [s for s in _candidate_specs(data.input_shape, num_classes)
                          if layer_sequence(build_second(s)) != primary_kinds]
            if not candidates:
                raise HardenError("the classifier has the layer sequence of every second model harden can train; "
                                  "give a structurally different one with --second-model")
            spec = candidates[0]
            seed = key_seed(options.key, f"mismatch:second:{options.seed}") % 2**63
            recipe = s.second_recipe
            second_eps, strength = _second_eps(ctx, strength) if recipe != "plain" else (0.0, strength)
            second, training = _train_second(spec, data.train.x, data.train.y, seed, options.device, ctx.progress,
                                             recipe=recipe, input_range=data.input_range, classifier=ctx.gm,
                                             eps=second_eps)
            if recipe != "plain" and not _learned_enough(training, num_classes):
                failed = training
                second, training = _train_second(spec, data.train.x, data.train.y, seed, options.device,
                                                 ctx.progress, recipe="plain", input_range=data.input_range)
                training["fell_back"] = {"recipe": recipe, "holdout_accuracy": failed["holdout_accuracy"],
                                         "fgsm_eps": failed.get("fgsm_eps")}
            kinds = layer_sequence(second)
            source = {"from": "trained" if train_flag else "trained (default: no --second-model given)",
                      "kind": spec["kind"]}

        train_acc = _accuracy(second, data.train.x, data.train.y)
        primary_train_acc = _accuracy(ctx.gm, data.train.x, data.train.y)
        if training is not None:
            _check_trained_second(training, num_classes)
        if path and train_acc < USER_SECOND_MIN_RATIO * primary_train_acc:
            raise HardenError(
                f"the second model gets {train_acc:.1%} of the training split right (the classifier "
                f"{primary_train_acc:.1%}): it does not read the inputs as it was trained to. Both models receive "
                f"the same tensor in the input range {data.input_range[0]:g},{data.input_range[1]:g}; a model "
                "trained on normalised inputs must contain its normalisation"
            )
        head = MismatchHead(second).eval()

        ctx.progress("mismatch: adversarial training examples", 0.35)
        xs, labels, groups, set_facts = adversarial_training_set(ctx, ctx.gm, second, specs, max_train)
        features = _features(head, ctx.gm, xs)
        ctx.progress("mismatch: fitting the SVM", 0.85)
        pipeline, svm_facts = fit_svm(features, labels, groups, c=c, gamma=gamma,
                                      seed=key_seed(options.key, "mismatch:cv") % 2**32)
        n_features = 2 * num_classes
        detector = RbfSvmDetector(pipeline, self.name, n_features)

        test = data.test
        with torch.no_grad():
            agree = float((_predict(ctx.gm, test.x) == _predict(second, test.x)).float().mean()) if len(test) else None
        config: dict[str, Any] = {
            "second": spec if spec["kind"] != "graph" else {"kind": "graph"},
            "second_source": source,
            "second_layers": kinds,
            "classifier_layers": primary_kinds,
            "second_test_accuracy": round(_accuracy(second, test.x, test.y), 4),
            "classifier_test_accuracy": round(_accuracy(ctx.gm, test.x, test.y), 4),
            "test_agreement": None if agree is None else round(agree, 4),
            "num_classes": num_classes,
            "n_features": n_features,
            "features": "concat(softmax(classifier logits), softmax(second model logits))",
            "attacks": [s.label() for s in specs],
            "attack_strength": auto_eps_facts(strength, len(data.train)),
            "training_set": set_facts,
            "max_train": max_train,
            "svm": svm_facts,
            "key_fingerprint": key_fingerprint(options.key),
            "fit_seconds": round(time.perf_counter() - started, 2),
        }
        if training is not None:
            config["second_training"] = training
        if spec["kind"] == "graph":
            # The graph document and constants stay out of the ONNX metadata (keys starting with '_').
            config["_second_graph"] = spec["graph"]
            config["_second_constants"] = spec["constants"]
        return FittedMethod(self.name, config, head, [INPUT, LOGITS], detector=detector, sites=[])

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        spec = dict(config["second"])
        if spec.get("kind") == "graph":
            spec["graph"] = config["_second_graph"]
            spec["constants"] = config.get("_second_constants", {})
        return MismatchHead(build_second(spec)).eval()
