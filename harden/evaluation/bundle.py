"""A bundle evaluated on its own data: attacks and given adversarial sets, or the adaptive attack, judged by the
exported graph."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from harden.attacks.catalog import parse_attack
from harden.bundle.archive import load_bundle
from harden.bundle.data import SPLITS, bundle_data, split_of
from harden.core.arguments import check_choice, check_count, check_eps, check_limit
from harden.errors import HardenError
from harden.evaluation.evaluate import EvaluationReport, evaluate, evaluate_adaptive
from harden.export.runtime import OnnxGraph
from harden.export.scorer import scorer_for
from harden.instrumentation.hardened import HardenedModel, original_classifier
from harden.io.adversarial import load_adversarial


def check_evaluate_arguments(split: str, limit, *, adaptive_eps: float | None = None, adaptive_norm: str = "linf",
                             adaptive_steps: int = 1, attackers=None, input_range=None) -> None:
    """What evaluate can check before a bundle is read."""
    from harden.methods.surrogates import ATTACKERS

    check_choice(split, SPLITS, "--split")
    check_limit(limit)
    check_choice(adaptive_norm, ("linf", "l2"), "--adaptive-norm")
    check_count(adaptive_steps, "--adaptive-steps", 1)
    for attacker in attackers or ():
        check_choice(attacker, ATTACKERS, "--adaptive-attacker")
    if adaptive_eps is not None:
        if adaptive_norm == "linf" and input_range is not None:
            check_eps(adaptive_eps, input_range, "--adaptive-eps")
        elif isinstance(adaptive_eps, bool) or not isinstance(adaptive_eps, (int, float)) \
                or not math.isfinite(adaptive_eps) or adaptive_eps <= 0:
            raise HardenError(f"--adaptive-eps must be a finite number > 0, got {adaptive_eps!r:.40}")


def evaluate_bundle(hardened: HardenedModel, manifest: dict, attacks: list[str], *, onnx_path: Path | None = None,
                    data: str | None = None, split: str = "test", limit: int | None = 500, seed: int = 0,
                    progress: Callable[[str], None] | None = None, adversarial: list[Path] = (),
                    graph: OnnxGraph | None = None) -> EvaluationReport:
    """Attacks (ART) against the classifier, and adversarial sets crafted elsewhere (``adversarial``: .npz
    files, :mod:`harden.io.adversarial`); alarms and scores read from the ONNX graph in onnxruntime:
    ``graph`` (a session :func:`harden.export.scorer.scorer_for` made already), else ``onnx_path`` or a fresh
    export."""
    check_evaluate_arguments(split, limit)
    specs = [parse_attack(a) for a in attacks]
    given = [load_adversarial(p, input_shape=tuple(manifest["input"]["shape"]), num_classes=manifest["num_classes"],
                              input_range=tuple(manifest["input"]["range"])) for p in adversarial]
    dataset = bundle_data(manifest, data)
    part = split_of(dataset, split)
    graph = graph or scorer_for(hardened, onnx_path)
    return evaluate(hardened.classifier, graph.run, part.x.numpy(), part.y.numpy(), specs,
                    input_range=tuple(manifest["input"]["range"]), num_classes=manifest["num_classes"],
                    seed=seed, limit=limit, progress=progress, given=given)


def evaluate_adaptive_bundle(hardened: HardenedModel, manifest: dict, *, eps: float = 0.1, norm: str = "linf",
                             steps: int = 100, onnx_path: Path | None = None, data: str | None = None,
                             split: str = "test", limit: int | None = 500, attackers: tuple[str, ...] | None = None,
                             proxy: Path | None = None, progress: Callable[[str], None] | None = None,
                             seal_key: str | None = None) -> dict:
    """Type II attacks (key known: smoothed surrogates of the detectors as shipped; key unknown: the attacker's
    own model of the keyed parts, or a proxy bundle hardened with another key) beside the detector-blind
    baseline, every final input judged by the exported graph."""
    from harden.evaluation.adaptive import AdaptiveSettings

    check_evaluate_arguments(split, limit, adaptive_eps=eps, adaptive_norm=norm, adaptive_steps=steps,
                             attackers=attackers, input_range=tuple(manifest["input"]["range"]))
    dataset = bundle_data(manifest, data)
    part = split_of(dataset, split)
    proxy_model = None
    if proxy is not None:
        proxy_model, proxy_manifest = load_bundle(proxy, seal_key=seal_key)
        if list(proxy_manifest["input"]["shape"]) != list(manifest["input"]["shape"]) or \
                proxy_manifest["num_classes"] != manifest["num_classes"]:
            raise HardenError(f"--adaptive-proxy {proxy}: its input shape or class count differs from the bundle's")
    return evaluate_adaptive(hardened, scorer_for(hardened, onnx_path).run, part.x.numpy(), part.y.numpy(),
                             AdaptiveSettings(eps=eps, norm=norm, steps=steps),
                             input_range=tuple(manifest["input"]["range"]), num_classes=manifest["num_classes"],
                             limit=limit, progress=progress, reference=dataset.train.x, proxy=proxy_model,
                             attackers=attackers,
                             original=original_classifier(hardened) if hardened.original_state is not None else None)
