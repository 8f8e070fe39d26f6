"""The suite's model/data pairs: built in code, trained by the suite (seeded), cached under bench/suite/cache/.

Each pair is data + an architecture + a training recipe.  Data goes through harden's own loader and its one
seeded split (train / calibration / test), so a pair is exactly what a user would get from
``harden instrument --data ...``: the classifier trains on the train split only, defaults are chosen on the
calibration split, and the test split is only ever reported.

Cache: ``cache/<pair>-<hash>.pt`` (a state_dict) and ``.json`` (facts: accuracies, seconds); the hash covers the
pair's recipe and ``RECIPE_VERSION``, so a changed recipe retrains instead of reusing stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.suite.models import build
from bench.suite.shapes import make_shapes
from harden.io.data import Dataset, load_data

CACHE = Path(__file__).resolve().parent / "cache"
RECIPE_VERSION = 1
SPLIT_SEED = 0


@dataclass(frozen=True)
class Pair:
    name: str
    data: str                  # "mnist" | "digits" | "shapes:N" (N procedurally generated images)
    arch: str                  # a key of bench.suite.models.ARCHITECTURES
    limit: int | None          # samples of the data used (before the split)
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    epochs: int = 10
    lr: float = 2e-3
    batch: int = 64
    seed: int = 0

    def digest(self) -> str:
        text = json.dumps({**asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


PAIRS: dict[str, Pair] = {p.name: p for p in (
    Pair("lenet5-mnist", "mnist", "lenet5", limit=None, epochs=10, lr=3e-3),            # 3,000 train, ~97%
    Pair("mlp-mnist", "mnist", "mlp", limit=1400, epochs=15, lr=1e-3),                 # 840 train
    Pair("cnn-digits", "digits", "cnn", limit=None, epochs=20, lr=2e-3),              # 1,078 train, 8x8
    Pair("vgg-digits", "digits", "vgg", limit=None, fractions=(0.5, 0.25, 0.25), epochs=25, lr=1e-3),  # dropout
    Pair("resnet-shapes", "shapes:6600", "resnet", limit=None, epochs=20, lr=3e-3),    # 3,960 train, 32x32x3
    Pair("mobilenet-shapes", "shapes:3000", "mobilenet", limit=None, epochs=40, lr=5e-3),  # depthwise ReLU6
    Pair("resnet18-shapes", "shapes:6600", "resnet18", limit=None, epochs=8, lr=1e-3),   # torchvision's, 11.2M
)}


def data_spec(pair: Pair) -> str:
    """What harden's loader takes: a built-in name, or the cached .npz of a generated set."""
    if not pair.data.startswith("shapes:"):
        return pair.data
    n = int(pair.data.split(":", 1)[1])
    path = CACHE / f"shapes-{n}-seed0.npz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        x, y = make_shapes(n, seed=0)
        _atomic(path, lambda tmp: np.savez_compressed(tmp, x=x, y=y), suffix=".npz")
    return str(path)


def load_pair_data(pair: Pair) -> Dataset:
    return load_data(data_spec(pair), seed=SPLIT_SEED, limit=pair.limit, fractions=pair.fractions)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    return hits / max(1, len(x))


def train(pair: Pair, data: Dataset) -> nn.Module:
    """Adam with a cosine schedule on the train split only; eval mode on return."""
    model = build(pair.arch, data.input_shape, data.num_classes, pair.seed)
    generator = torch.Generator().manual_seed(pair.seed)
    x, y = data.train.x, data.train.y
    steps = pair.epochs * -(-len(x) // pair.batch)
    opt = torch.optim.Adam(model.parameters(), lr=pair.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(pair.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), pair.batch):
            idx = order[start:start + pair.batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    return model.eval()


def _atomic(path: Path, write, suffix: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class LoadedPair:
    pair: Pair
    model: nn.Module
    data: Dataset
    facts: dict


def load_pair(name: str | Pair, *, small: bool = False, cache: bool = True) -> LoadedPair:
    """The trained pair (from the cache when its recipe is unchanged).  ``small``: 300 samples and 2 epochs, for
    tests of the pipeline itself (never cached).  ``name`` may be a Pair outside the suite (bench/ scripts)."""
    if isinstance(name, Pair):
        pair = name
    elif name not in PAIRS:
        raise KeyError(f"unknown pair {name!r}; pairs: {', '.join(PAIRS)}")
    else:
        pair = PAIRS[name]
    if small:
        pair = replace(pair, limit=300, epochs=2)
        cache = False
    data = load_pair_data(pair)
    weights, facts_path = CACHE / f"{pair.name}-{pair.digest()}.pt", CACHE / f"{pair.name}-{pair.digest()}.json"
    if cache and weights.exists() and facts_path.exists():
        model = build(pair.arch, data.input_shape, data.num_classes, pair.seed)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return LoadedPair(pair, model.eval(), data, json.loads(facts_path.read_text()))
    started = time.perf_counter()
    model = train(pair, data)
    facts = {
        "pair": pair.name, "arch": pair.arch, "data": pair.data, "input_shape": list(data.input_shape),
        "sizes": data.split["sizes"], "train_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "calibration_accuracy": accuracy(model, data.calibration.x, data.calibration.y),
        "test_accuracy": accuracy(model, data.test.x, data.test.y),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        _atomic(weights, lambda tmp: torch.save(model.state_dict(), tmp), suffix=".pt")
        _atomic(facts_path, lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=1)), suffix=".json")
    return LoadedPair(pair, model, data, facts)
