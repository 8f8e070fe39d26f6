"""The ``*.hardened`` bundle: one zip file, loadable without unpickling anything.

Members: ``manifest.json``; the classifier graph as JSON + ``.npz`` tensors
(see ``harden.graph.graphfile``); ``original.npz`` (the user's weights, when a
method fine-tuned them); ``heads/<method>.npz``; ``detectors/<method>.onnx``;
``golden.npz`` (held-out inputs and the reference outputs export checks against).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from harden.detectors.onnx_detector import OnnxDetector
from harden.errors import HardenError
from harden.instrumentation.hardened import HardenedModel
from harden.io.atomic import atomic_path
from harden.graph.graphfile import graph_from_json, graph_to_json
from harden.bundle.manifest import FORMAT, build_manifest
from harden.methods import load_all  # noqa: F401
from harden.methods.base import METHODS, FittedMethod, load_arrays, tensor_arrays
from harden.detectors.policy import AlarmPolicy


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def save_bundle(hardened: HardenedModel, path: str | Path) -> dict:
    manifest = build_manifest(hardened)
    graph_doc, graph_arrays = graph_to_json(hardened.classifier)
    with atomic_path(Path(path)) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        zf.writestr("classifier.json", json.dumps(graph_doc))
        zf.writestr("classifier.npz", _npz_bytes(graph_arrays))
        if hardened.original_state is not None:
            zf.writestr("original.npz", _npz_bytes({k: v.cpu().numpy() for k, v in hardened.original_state.items()}))
        for method in hardened.methods:
            zf.writestr(f"heads/{method.name}.npz", _npz_bytes(tensor_arrays(method.head)))
            if method.detector is not None:
                zf.writestr(f"detectors/{method.name}.onnx", method.detector.onnx_model())
        zf.writestr("golden.npz", _npz_bytes(hardened.golden))
    return manifest


def read_manifest(path: str | Path) -> dict:
    with _open(path) as zf:
        return _manifest(zf, path)


def _open(path: str | Path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise HardenError(f"no bundle at {path}")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise HardenError(f"{path} is not a harden bundle (not a zip file)") from None


def _manifest(zf: zipfile.ZipFile, path) -> dict:
    try:
        manifest = json.loads(zf.read("manifest.json"))
    except KeyError:
        raise HardenError(f"{path} is not a harden bundle (no manifest.json)") from None
    except ValueError:
        raise HardenError(f"{path}: manifest.json is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise HardenError(f"{path}: bundle format {manifest.get('format')!r} is not supported (this harden reads {FORMAT})")
    return manifest


def load_bundle(path: str | Path) -> tuple[HardenedModel, dict]:
    with _open(path) as zf:
        manifest = _manifest(zf, path)
        try:
            classifier = graph_from_json(json.loads(zf.read("classifier.json")), _npz_load(zf.read("classifier.npz")))
            original = None
            if "original.npz" in zf.namelist():
                original = {k: torch.from_numpy(v.copy()) for k, v in _npz_load(zf.read("original.npz")).items()}
            methods = []
            for entry in manifest["methods"]:
                name = entry["name"]
                cls = METHODS.get(name)
                head = load_arrays(cls.build_head(entry["config"]), _npz_load(zf.read(f"heads/{name}.npz")))
                detector = OnnxDetector(zf.read(f"detectors/{name}.onnx")) if entry["detector"] else None
                methods.append(FittedMethod(name, entry["config"], head.eval(), entry["head_inputs"], detector, entry["sites"]))
            golden = _npz_load(zf.read("golden.npz"))
        except KeyError as exc:
            raise HardenError(f"{path}: the bundle is incomplete ({exc.args[0]} missing)") from None
    policy = AlarmPolicy([m["threshold"] for m in manifest["methods"]], [m["scale"] for m in manifest["methods"]],
                         manifest["policy"]["k"])
    facts = {k: v for k, v in manifest.items() if k not in ("methods", "format", "created", "outputs", "packages", "finetuned")}
    facts["thresholds"] = {m["name"]: m["threshold"] for m in manifest["methods"]}
    facts["scales"] = {m["name"]: m["scale"] for m in manifest["methods"]}
    hardened = HardenedModel(classifier, methods, policy, facts=facts, original_state=original, golden=golden)
    return hardened, manifest
