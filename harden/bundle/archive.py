"""The ``*.hardened`` bundle: one zip file, loadable without unpickling anything.

Members: ``manifest.json``; the classifier graph as JSON + ``.npz`` tensors
(see ``harden.graph.graphfile``); ``original.npz`` (the user's weights, when a
method fine-tuned them); ``heads/<method>.npz``; ``detectors/<method>.onnx``;
``golden.npz`` (held-out inputs and the reference outputs export checks against);
``seal.json`` when sealed (:mod:`harden.bundle.seal`).

A bundle may come from someone else, so :func:`load_bundle` treats it as data: every member is read within
the caps of :mod:`harden.core.limits`, the manifest is checked field by field, the graph against the
graph-file allowlist, the sizes of every tensor the graph and the heads would create on the meta device,
the heads' and detectors' arrays against what the manifest says, and finally the model is run on the
bundle's own reference inputs and must reproduce its reference outputs (the golden check), before any
command uses it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from harden.bundle import seal as sealing
from harden.bundle.manifest import build_manifest, validate_manifest
from harden.core.limits import MAX_ARCHIVE_BYTES
from harden.core.parity import compare
from harden.detectors.onnx_detector import OnnxDetector, check_detector_onnx
from harden.detectors.policy import AlarmPolicy
from harden.errors import HardenError
from harden.graph.graphfile import graph_from_json, graph_to_json
from harden.graph.sizes import CreationBudget, check_module_sizes, check_sizes
from harden.instrumentation.hardened import HardenedModel
from harden.io.atomic import atomic_path
from harden.io.safezip import SafeZip, parse_json, read_npz
from harden.methods import load_all  # noqa: F401
from harden.methods.base import INPUT, LOGITS, METHODS, FittedMethod, load_arrays, tensor_arrays

MAX_GOLDEN = 4096   # reference inputs a bundle may carry (harden writes 258)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def bundle_members(hardened: HardenedModel, manifest: dict) -> dict[str, bytes]:
    graph_doc, graph_arrays = graph_to_json(hardened.classifier)
    members = {
        "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode(),
        "classifier.json": json.dumps(graph_doc).encode(),
        "classifier.npz": _npz_bytes(graph_arrays),
    }
    if hardened.original_state is not None:
        members["original.npz"] = _npz_bytes({k: v.cpu().numpy() for k, v in hardened.original_state.items()})
    for method in hardened.methods:
        members[f"heads/{method.name}.npz"] = _npz_bytes(tensor_arrays(method.head))
        if method.detector is not None:
            members[f"detectors/{method.name}.onnx"] = method.detector.onnx_model()
    members["golden.npz"] = _npz_bytes(hardened.golden)
    return members


def save_bundle(hardened: HardenedModel, path: str | Path, *, seal_key: str | None = None,
                inputs: Iterable[str | Path | None] = ()) -> dict:
    """Write the bundle atomically (never over one of ``inputs``); sealed when a seal key is given or set."""
    manifest = build_manifest(hardened)
    members = bundle_members(hardened, manifest)
    key = sealing.resolve_key(seal_key)
    if key is not None:
        members[sealing.SEAL_MEMBER] = json.dumps(sealing.seal_document(members, key)).encode()
    with atomic_path(Path(path), inputs) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    return manifest


def _read_members(path: str | Path) -> tuple[dict[str, bytes], str]:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise HardenError(f"no bundle at {path}")
    if path.stat().st_size > MAX_ARCHIVE_BYTES:
        raise HardenError(f"{where} is {path.stat().st_size:,} bytes, above the cap of {MAX_ARCHIVE_BYTES:,}")
    data = path.read_bytes()   # read once: every check below and the load itself see the same bytes
    try:
        archive = SafeZip(data, where)
    except HardenError as exc:
        if "not a readable zip" in str(exc):
            raise HardenError(f"{where} is not a harden bundle (not a zip file)") from None
        raise
    with archive:
        if "manifest.json" not in archive:
            raise HardenError(f"{where} is not a harden bundle (no manifest.json)")
        return {name: archive.read(name) for name in archive.names()}, where


def read_manifest(path: str | Path, seal_key: str | None = None) -> dict:
    """The manifest alone, checked field by field (and the seal, when a key is given or set)."""
    members, where = _read_members(path)
    _check_seal(members, seal_key, where)
    return validate_manifest(parse_json(members["manifest.json"], f"{where}: manifest.json"), f"{where}: manifest.json")


def _check_seal(members: dict[str, bytes], seal_key: str | None, where: str) -> str:
    document = None
    if sealing.SEAL_MEMBER in members:
        document = parse_json(members[sealing.SEAL_MEMBER], f"{where}: {sealing.SEAL_MEMBER}")
    return sealing.verify(members, document, sealing.resolve_key(seal_key), where)


def _expected_members(manifest: dict) -> tuple[set[str], set[str]]:
    required = {"manifest.json", "classifier.json", "classifier.npz", "golden.npz"}
    if manifest["finetuned"]:
        required.add("original.npz")
    for entry in manifest["methods"]:
        required.add(f"heads/{entry['name']}.npz")
        if entry["detector"]:
            required.add(f"detectors/{entry['name']}.onnx")
    return required, {sealing.SEAL_MEMBER}


def _same_arrays(expected: dict[str, torch.Tensor], got: dict[str, np.ndarray], what: str) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise HardenError(f"{what}: arrays do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, tensor in expected.items():
        array = got[key]
        dtype = torch.empty(0, dtype=tensor.dtype, device="cpu").numpy().dtype
        if list(array.shape) != list(tensor.shape) or array.dtype != dtype:
            raise HardenError(f"{what}: array {key!r} is {array.dtype}{list(array.shape)}, expected "
                              f"{dtype}{list(tensor.shape)}")


def _build_head(cls, config: dict, arrays: dict[str, np.ndarray], where: str) -> torch.nn.Module:
    """The head on the meta device first (no memory, a budget on what it creates), its tensors matched against
    the stored arrays, then built for real and filled."""
    try:
        with torch.device("meta"), CreationBudget(where):
            probe = cls.build_head(config)
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config that does not build is bad input, whatever it raises
        raise HardenError(f"{where}: its config does not build a head ({_first_line(exc)})") from None
    check_module_sizes(probe, where)
    _same_arrays(probe.state_dict(), arrays, where)
    try:
        head = cls.build_head(config)
        return load_arrays(head, arrays).eval()
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise HardenError(f"{where}: its config does not build a head ({_first_line(exc)})") from None


def _golden(arrays: dict[str, np.ndarray], manifest: dict, logits: int, where: str) -> dict[str, np.ndarray]:
    outputs = manifest["outputs"]
    expected = {"input", *outputs}
    if set(arrays) != expected:
        raise HardenError(f"{where}: golden.npz holds {sorted(arrays)[:8]}, expected {sorted(expected)}")
    x = arrays["input"]
    n = x.shape[0] if x.ndim == 4 else 0
    if x.dtype != np.float32 or list(x.shape[1:]) != list(manifest["input"]["shape"]) or not 1 <= n <= MAX_GOLDEN:
        raise HardenError(f"{where}: golden.npz input is {x.dtype}{list(x.shape)}, expected float32 "
                          f"[1..{MAX_GOLDEN}, {', '.join(map(str, manifest['input']['shape']))}]")
    lo, hi = manifest["input"]["range"]
    finite = x[np.isfinite(x)]
    if finite.size and (float(finite.min()) < lo or float(finite.max()) > hi):
        raise HardenError(f"{where}: golden.npz inputs span [{float(finite.min()):g}, {float(finite.max()):g}], "
                          f"outside the manifest's input range [{lo:g}, {hi:g}]")
    shapes = {name: ([n, logits] if name == "logits" else [n]) for name in outputs}
    for name in outputs:
        value = arrays[name]
        dtype = np.bool_ if name.endswith("alarm") else np.float32
        if list(value.shape) != shapes[name] or value.dtype != dtype:
            raise HardenError(f"{where}: golden.npz {name} is {value.dtype}{list(value.shape)}, expected "
                              f"{np.dtype(dtype)}{shapes[name]}")
    return arrays


def load_bundle(path: str | Path, *, seal_key: str | None = None) -> tuple[HardenedModel, dict]:
    """A bundle checked as data from elsewhere (see the module docstring); every problem is one HardenError line.

    ``seal_key``: the secret the bundle was sealed with (default: ``HARDEN_SEAL_KEY`` when set); with a key,
    a bundle without a matching seal is refused.
    """
    members, where = _read_members(path)
    seal_state = _check_seal(members, seal_key, where)
    manifest = validate_manifest(parse_json(members["manifest.json"], f"{where}: manifest.json"),
                                 f"{where}: manifest.json")
    required, optional = _expected_members(manifest)
    missing = sorted(required - set(members))
    if missing:
        raise HardenError(f"{where}: the bundle is incomplete ({missing[0]} missing)")
    unknown = sorted(set(members) - required - optional)
    if unknown:
        raise HardenError(f"{where}: holds {unknown[0]!r:.80}, which is not part of a harden bundle")
    shape = tuple(manifest["input"]["shape"])
    num_classes = manifest["num_classes"]

    classifier = graph_from_json(parse_json(members["classifier.json"], f"{where}: classifier.json"),
                                 read_npz(members["classifier.npz"], f"{where}: classifier.npz"))
    out = check_sizes(classifier, (2, *shape), f"{where}: classifier graph")
    if not isinstance(out, torch.Tensor) or list(out.shape) != [2, num_classes]:
        raise HardenError(f"{where}: the classifier graph returns {_shape_of(out)} for input {list(shape)}, but the "
                          f"manifest says {num_classes} classes")
    outputs_per_row = int(out.shape[1])
    node_names = {n.name for n in classifier.graph.nodes}
    original = None
    if manifest["finetuned"]:
        arrays = read_npz(members["original.npz"], f"{where}: original.npz")
        _same_arrays(classifier.state_dict(), arrays, f"{where}: original.npz")
        original = {k: torch.from_numpy(v) for k, v in arrays.items()}

    methods = []
    for entry in manifest["methods"]:
        name = entry["name"]
        what = f"{where}: method {name}"
        unknown_nodes = [n for n in [*entry["head_inputs"], *entry["sites"]]
                         if n not in node_names and n not in (INPUT, LOGITS)]
        if unknown_nodes:
            raise HardenError(f"{what} reads {unknown_nodes[0]!r:.60}, which is not a node of the classifier graph")
        head = _build_head(METHODS.get(name), entry["config"],
                           read_npz(members[f"heads/{name}.npz"], f"{where}: heads/{name}.npz"), what)
        detector = None
        if entry["detector"]:
            model = members[f"detectors/{name}.onnx"]
            check_detector_onnx(model, name, f"{where}: detectors/{name}.onnx")
            detector = OnnxDetector(model, f"{where}: detectors/{name}.onnx")
        methods.append(FittedMethod(name, entry["config"], head, entry["head_inputs"], detector, entry["sites"]))
    golden = _golden(read_npz(members["golden.npz"], f"{where}: golden.npz"), manifest, outputs_per_row, where)

    policy = AlarmPolicy([m["threshold"] for m in manifest["methods"]], [m["scale"] for m in manifest["methods"]],
                         manifest["policy"]["k"])
    facts = {k: v for k, v in manifest.items() if k not in ("methods", "format", "created", "outputs", "packages", "finetuned")}
    facts["thresholds"] = {m["name"]: m["threshold"] for m in manifest["methods"]}
    facts["scales"] = {m["name"]: m["scale"] for m in manifest["methods"]}
    hardened = HardenedModel(classifier, methods, policy, facts=facts, original_state=original, golden=golden)
    hardened.seal_state = seal_state   # not a fact: a bundle written from this model is sealed (or not) anew
    try:
        graph = hardened.graph
    except Exception as exc:  # noqa: BLE001 - heads that do not fit the classifier's graph
        raise HardenError(f"{where}: the methods' heads do not fit the classifier graph ({_first_line(exc)})") from None
    check_sizes(graph, (2, *shape), f"{where}: instrumented graph")
    verify_golden(hardened, where)
    return hardened, manifest


def verify_golden(hardened: HardenedModel, where: str) -> None:
    """The model must reproduce the outputs recorded with it on the same inputs (the bundle's self-check)."""
    try:
        got = hardened.run(hardened.golden["input"])
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crafted model failing on its own inputs is bad input
        raise HardenError(f"{where}: the model fails on its own reference inputs ({_first_line(exc)})") from None
    try:
        compare(hardened.golden, got, "golden check")
    except HardenError as exc:
        raise HardenError(f"{where}: the model does not reproduce its recorded outputs, so the bundle was altered "
                          f"or damaged ({exc})") from None


def _shape_of(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
