"""The Python API the CLI wraps: load, instrument, export, certify, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harden.errors import HardenError
from harden.instrumentation.hardened import HardenedModel
from harden.io.data import Dataset, load_data as _load_data


def load_model(path, arch: str | None = None, trust_pickle: bool = False):
    from harden.io.model import load_model as _load

    return _load(path, arch, trust_pickle)


def load_data(spec: str, **kwargs) -> Dataset:
    return _load_data(spec, **kwargs)


def instrument(model, data: Dataset, methods: list[str], options=None, *, policy: str = "any",
               progress: Callable[[str, float], None] = lambda m, f: None, finetune: str | None = None) -> HardenedModel:
    from harden.instrumentation.pipeline import instrument as _instrument

    return _instrument(model, data, methods, options, policy=policy, progress=progress, finetune=finetune)


def save_bundle(hardened: HardenedModel, path) -> dict:
    from harden.bundle.archive import save_bundle as _save

    return _save(hardened, path)


def load_bundle(path) -> tuple[HardenedModel, dict]:
    from harden.bundle.archive import load_bundle as _load

    return _load(path)


def export_onnx(hardened: HardenedModel, path=None, source=None):
    from harden.export import export_onnx as _export

    return _export(hardened, path, source)


def bundle_data(manifest: dict, data: str | None = None) -> Dataset:
    """The data a bundle was instrumented on, split exactly as then (or other data, split with the same seed)."""
    split = manifest["data"]["split"]
    spec = data or manifest["data"]["name"]
    kwargs = {"seed": split.get("seed", 0), "input_range": tuple(manifest["input"]["range"])}
    if "fractions" in split:
        kwargs["fractions"] = tuple(split["fractions"])
    if data is None and split.get("limit"):
        kwargs["limit"] = split["limit"]
    dataset = _load_data(spec, **kwargs)
    if list(dataset.input_shape) != list(manifest["input"]["shape"]):
        raise HardenError(f"data {spec!r} has input shape {dataset.input_shape}; the bundle expects {tuple(manifest['input']['shape'])}")
    if data is None and dataset.split.get("fingerprint") != split.get("fingerprint"):
        raise HardenError(f"data {spec!r} no longer splits as it did when the bundle was made (fingerprint differs)")
    return dataset


def split_of(dataset: Dataset, name: str):
    if name not in ("train", "calibration", "test"):
        raise HardenError(f"--split {name!r} is not one of train, calibration, test")
    return getattr(dataset, name)


def scorer_for(hardened: HardenedModel, onnx_path: Path | None, source=None):
    """An onnxruntime session of the exported graph: the given file, or a fresh parity-checked export."""
    from harden.export.runtime import OnnxGraph

    if onnx_path is not None:
        graph = OnnxGraph(onnx_path)
        bundle_id = hardened.facts.get("bundle_id")
        if graph.metadata.get("harden.bundle_id") != bundle_id:
            raise HardenError(f"{onnx_path} was not exported from this bundle (bundle ids differ)")
        return graph
    result = export_onnx(hardened, None, source)
    return OnnxGraph(result.model.SerializeToString())


def evaluate(hardened: HardenedModel, manifest: dict, attacks: list[str], *, onnx_path: Path | None = None,
             data: str | None = None, split: str = "test", limit: int | None = 500, seed: int = 0,
             progress: Callable[[str], None] | None = None, adversarial: list[Path] = ()):
    """Attacks (ART) against the classifier, and adversarial sets crafted elsewhere (``adversarial``: .npz
    files, :mod:`harden.io.adversarial`); alarms and scores read from the ONNX graph in onnxruntime."""
    from harden.attacks.catalog import parse_attack
    from harden.evaluation.evaluate import evaluate as _evaluate
    from harden.io.adversarial import load_adversarial

    specs = [parse_attack(a) for a in attacks]
    given = [load_adversarial(p, input_shape=tuple(manifest["input"]["shape"]), num_classes=manifest["num_classes"],
                              input_range=tuple(manifest["input"]["range"])) for p in adversarial]
    dataset = bundle_data(manifest, data)
    part = split_of(dataset, split)
    graph = scorer_for(hardened, onnx_path)
    return _evaluate(hardened.classifier, graph.run, part.x.numpy(), part.y.numpy(), specs,
                     input_range=tuple(manifest["input"]["range"]), num_classes=manifest["num_classes"],
                     seed=seed, limit=limit, progress=progress, given=given)



def evaluate_adaptive(hardened: HardenedModel, manifest: dict, *, eps: float = 0.1, norm: str = "linf",
                      steps: int = 100, onnx_path: Path | None = None, data: str | None = None, split: str = "test",
                      limit: int | None = 500, attackers: tuple[str, ...] | None = None, proxy: Path | None = None,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Type II attacks (key known: smoothed surrogates of the detectors as shipped; key unknown: the attacker's
    own model of the keyed parts, or a proxy bundle hardened with another key) beside the detector-blind
    baseline, every final input judged by the exported graph."""
    from harden.evaluation.adaptive import AdaptiveSettings
    from harden.evaluation.evaluate import evaluate_adaptive as _evaluate_adaptive
    from harden.bundle.archive import load_bundle

    dataset = bundle_data(manifest, data)
    part = split_of(dataset, split)
    proxy_model = None
    if proxy is not None:
        proxy_model, proxy_manifest = load_bundle(proxy)
        if list(proxy_manifest["input"]["shape"]) != list(manifest["input"]["shape"]) or \
                proxy_manifest["num_classes"] != manifest["num_classes"]:
            raise HardenError(f"--adaptive-proxy {proxy}: its input shape or class count differs from the bundle's")
    return _evaluate_adaptive(hardened, scorer_for(hardened, onnx_path).run, part.x.numpy(), part.y.numpy(),
                              AdaptiveSettings(eps=eps, norm=norm, steps=steps),
                              input_range=tuple(manifest["input"]["range"]), num_classes=manifest["num_classes"],
                              limit=limit, progress=progress, reference=dataset.train.x, proxy=proxy_model,
                              attackers=attackers,
                              original=original_classifier(hardened) if hardened.original_state is not None else None)


def ctt_traps(hardened: HardenedModel):
    """The CTT traps as the exported alarm sees them: each neuron's T shifted by its method's calibrated threshold.

    A CTT method alarms when max_i (x_i - T_i) / s_i > t (s_i = 1 unless the head is scaled), i.e. when some
    x_i > T_i + t s_i.
    """
    from harden.certification.certify import Trap

    traps = []
    for method in hardened.methods:
        if not method.name.startswith("ctt-"):
            continue
        shift = float(hardened.facts["thresholds"][method.name])
        for i, site in enumerate(method.sites):
            indices, _ = method.head.trap(i)
            traps.append(Trap(site, indices.clone(), method.head.alarm_thresholds(i, shift).clone()))
    return traps


def original_classifier(hardened: HardenedModel):
    """The user's model before any fine-tuning (same graph, original weights)."""
    import copy

    if hardened.original_state is None:
        return hardened.classifier
    original = copy.deepcopy(hardened.classifier)
    original.load_state_dict(hardened.original_state)
    return original


def certify(hardened: HardenedModel, manifest: dict, eps: list[float] | None = None, *, data: str | None = None,
            split: str = "test", limit: int | None = None, check: int = 0, seed: int = 0, bounds: str = "ibp",
            threats: list[str] | None = None,
            progress: Callable[[str, float], None] = lambda m, f: None) -> dict:
    """Placement, robust and detect-or-robust certificates (hardened vs original), and the sampling check.

    ``bounds``: ``ibp`` (interval), ``crown-ibp`` (backward linear-relaxation margin on interval intermediates)
    or ``crown`` (backward linear relaxation throughout; tightest, slowest).
    ``threats``: ``flow:delta=D[,tv=T]`` texts (:mod:`harden.certification.flow`) certified instead of the
    L-inf boxes of ``eps`` (``linf`` stands for those boxes); results are keyed by each threat's label.
    """
    from harden.certification.certify import BOUND_LABELS, certify_samples, check_bound_method, check_certificates
    from harden.certification.flow import parse_threat
    from harden.certification.sdp import certify_sdp, check_sdp

    check_bound_method(bounds)
    parsed = [parse_threat(t) for t in threats or []]
    if any(t is None for t in parsed) or not parsed:
        eps_list = list(eps) if eps else [float(manifest.get("eps") or 3e-3)]
    else:
        if eps:
            raise HardenError("--eps sets the L-inf box; with only flow threats, add --threat linf to certify it too")
        eps_list = []
    for value in eps_list:
        if not value >= 0:
            raise HardenError(f"--eps must be >= 0; got {value}")
    sets = [(f"{value:g}", value) for value in eps_list] + [(t.label(), t) for t in parsed if t is not None]
    if check < 0:
        raise HardenError("--check must be >= 0")
    part = split_of(bundle_data(manifest, data), split)
    x, y = part.x, part.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    input_range = tuple(manifest["input"]["range"])
    traps = ctt_traps(hardened)
    gm, original = hardened.classifier, original_classifier(hardened)
    k = manifest["policy"]["k"]
    report = {
        "samples": len(x), "split": split, "bounds": BOUND_LABELS[bounds], "bound_method": bounds,
        "policy": manifest["policy"]["text"],
        "traps": [{"site": t.node, "neurons": int(t.flat_indices.numel())} for t in traps],
        "note": ("the detect-or-robust certificate concerns the CTT alarm; under policy 'any' the combined "
                 "alarm fires whenever the CTT alarm does" if k == 1 else
                 "the detect-or-robust certificate concerns the CTT alarm only: under this policy the combined "
                 "alarm needs other methods to agree"),
        "results": {}, "check": {} if check else None, "interval_only": [],
    }
    steps = len(sets) * (3 if check else 2)
    done = 0
    for text, value in sets:
        progress(f"{_threat_words(text)}: bounds of the hardened model", done / steps)
        if bounds == "sdp":
            hardened_cert = certify_sdp(gm, x, y, value, input_range)
        else:
            hardened_cert = certify_samples(gm, traps, x, y, value, input_range, bounds=bounds,
                                            with_placement=bool(traps))
        place = hardened_cert.get("placement", [])
        done += 1
        progress(f"{_threat_words(text)}: bounds of the original model", done / steps)
        original_cert = (certify_sdp(original, x, y, value, input_range) if bounds == "sdp" else
                         certify_samples(original, [], x, y, value, input_range, bounds=bounds))
        report["interval_only"] = sorted(set(report["interval_only"]) | set(hardened_cert["interval_only"])
                                         | set(original_cert["interval_only"]))
        done += 1
        report["results"][text] = {
            "placement": place,
            "hardened": hardened_cert["fractions"],
            "original": original_cert["fractions"],
            "margin_method": hardened_cert["margin_method"],
        }
        if check:
            progress(f"{_threat_words(text)}: {check} points per sample through the real model", done / steps)
            if bounds == "sdp":
                results = [check_sdp(gm, x, y, value, input_range, hardened_cert["robust"], check, seed)]
                if original is not gm:
                    results.append(check_sdp(original, x, y, value, input_range, original_cert["robust"], check, seed))
            else:
                results = [check_certificates(gm, traps, x, y, value, input_range, check, seed, bounds=bounds)]
                if original is not gm:
                    results.append(check_certificates(original, [], x, y, value, input_range, check, seed,
                                                      bounds=bounds))
                results = [r.to_dict() for r in results]
            merged = {"points": sum(r["points"] for r in results), "violations": sum(r["violations"] for r in results),
                      "examples": [e for r in results for e in r["examples"]]}
            report["check"][text] = merged
            done += 1
    return report


def _threat_words(key: str) -> str:
    """A results key as words: ``eps 0.1`` for an L-inf box, the threat's own label otherwise."""
    return key if key.startswith("flow") else f"eps {key}"
