"""The Python API the CLI wraps: load, instrument, export, certify, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harden.errors import HardenError
from harden.hardened import HardenedModel
from harden.io.data import Dataset, load_data as _load_data


def load_model(path, arch: str | None = None, trust_pickle: bool = False):
    from harden.io.model import load_model as _load

    return _load(path, arch, trust_pickle)


def load_data(spec: str, **kwargs) -> Dataset:
    return _load_data(spec, **kwargs)


def instrument(model, data: Dataset, methods: list[str], options=None, *, policy: str = "any",
               progress: Callable[[str, float], None] = lambda m, f: None) -> HardenedModel:
    from harden.instrument import instrument as _instrument

    return _instrument(model, data, methods, options, policy=policy, progress=progress)


def save_bundle(hardened: HardenedModel, path) -> dict:
    from harden.io.bundle import save_bundle as _save

    return _save(hardened, path)


def load_bundle(path) -> tuple[HardenedModel, dict]:
    from harden.io.bundle import load_bundle as _load

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
    from harden.runtime import OnnxGraph

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
             progress: Callable[[str], None] | None = None):
    """Attacks (ART) against the classifier; alarms and scores read from the ONNX graph in onnxruntime."""
    from harden.attacks import parse_attack
    from harden.evaluation import evaluate as _evaluate

    specs = [parse_attack(a) for a in attacks]
    dataset = bundle_data(manifest, data)
    part = split_of(dataset, split)
    graph = scorer_for(hardened, onnx_path)
    return _evaluate(hardened.classifier, graph.run, part.x.numpy(), part.y.numpy(), specs,
                     input_range=tuple(manifest["input"]["range"]), num_classes=manifest["num_classes"],
                     seed=seed, limit=limit, progress=progress)


def ctt_traps(hardened: HardenedModel):
    """The CTT traps as the exported alarm sees them: each neuron's T shifted by its method's calibrated threshold.

    A CTT method alarms when max_i (x_i - T_i) > t, i.e. when some x_i > T_i + t.
    """
    from harden.certification import Trap

    traps = []
    for method in hardened.methods:
        if not method.name.startswith("ctt-"):
            continue
        shift = float(hardened.facts["thresholds"][method.name])
        for i, site in enumerate(method.sites):
            indices, thresholds = method.head.trap(i)
            traps.append(Trap(site, indices.clone(), thresholds.clone() + shift))
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
            progress: Callable[[str, float], None] = lambda m, f: None) -> dict:
    """Placement, robust and detect-or-robust certificates (hardened vs original), and the sampling check.

    ``bounds``: ``ibp`` (interval), ``crown-ibp`` (backward linear-relaxation margin on interval intermediates)
    or ``crown`` (backward linear relaxation throughout; tightest, slowest).
    """
    from harden.certification import certify_bundle

    return certify_bundle(hardened, manifest, eps, data=data, split=split, limit=limit, check=check, seed=seed,
                          bounds=bounds, progress=progress)
