"""Export stage: one ONNX graph (classifier + every detector + the alarm policy), parity-checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from harden.errors import HardenError
from harden.export.merge import connect, dedupe_opsets, prefixed
from harden.export.parity import ParityReport, compare, rounding_of
from harden.export.portable import PORTABLE_SCORE_TOLERANCE, TARGETS, float32_throughout
from harden.export.torch_graph import export_module
from harden.core.opsets import OPSET
from harden.instrumentation.hardened import FINITE_OUTPUT, LOGITS_OUTPUT, HardenedModel
from harden.io.atomic import atomic_write_bytes
from harden.bundle.manifest import public_manifest
from harden.export.runtime import OnnxGraph

INPUT_NAME = "input"


@dataclass
class ExportResult:
    model: onnx.ModelProto
    parity: ParityReport
    torch_parity: ParityReport
    path: Path | None = None


def _detector_model(method) -> onnx.ModelProto:
    model = onnx.load_from_string(method.detector.onnx_model())
    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    if ins != [f"{method.name}.features"] or outs != [f"{method.name}.raw"]:
        raise HardenError(f"detector of {method.name} has interface {ins} -> {outs}")
    return model


def build_onnx(hardened: HardenedModel, source: str | Path | None = None) -> onnx.ModelProto:
    example = torch.as_tensor(hardened.golden["input"][:2])
    graph = export_module(hardened.graph, (example,), [INPUT_NAME], hardened.output_names())
    combined = prefixed(graph, "classifier/")
    raw_names = []
    for method in hardened.methods:
        raw = f"{method.name}.raw"
        raw_names.append(raw)
        if method.detector is None:
            continue
        detector = prefixed(_detector_model(method), f"{method.name}/")
        keep = [o.name for o in combined.graph.output if o.name != method.feature_output] + [raw]
        combined = connect(combined, detector, [(method.feature_output, method.feature_output)], keep)

    finite = torch.ones(2, dtype=torch.bool)
    raws = tuple(torch.zeros(2) for _ in hardened.methods)
    policy = export_module(hardened.policy, (finite, *raws), [FINITE_OUTPUT, *raw_names],
                           hardened.policy_output_names(), varargs_after=1)
    policy = prefixed(policy, "policy/")
    outputs = [LOGITS_OUTPUT] + hardened.policy_output_names()
    io_map = [(FINITE_OUTPUT, FINITE_OUTPUT)] + [(r, r) for r in raw_names]
    merged = dedupe_opsets(connect(combined, policy, io_map, outputs))
    for i, node in enumerate(merged.graph.node):   # every node named: tools (quantisers) address nodes by name
        if not node.name:
            node.name = f"harden/{node.op_type}_{i}"
    merged.graph.name = "harden"
    merged.producer_name = "harden"
    del merged.metadata_props[:]
    manifest = public_manifest(hardened)
    props = {"harden.manifest": json.dumps(manifest, sort_keys=True), "harden.opset": str(OPSET),
             "harden.methods": ",".join(m.name for m in hardened.methods),
             "harden.key_fingerprint": manifest.get("key_fingerprint", ""),
             "harden.bundle_id": manifest.get("bundle_id", "")}
    if source is not None:
        props["harden.bundle"] = Path(source).name
    onnx.helper.set_model_props(merged, props)
    onnx.checker.check_model(merged)
    return merged


def _float64_reference(hardened: HardenedModel, x):
    """The outputs with the classifier in float64, or None for a classifier that will not run so (one that casts
    to float32 itself): its tolerances are then relative to each output's magnitude alone."""
    try:
        return hardened.run(x, float64_classifier=True)
    except (RuntimeError, TypeError):
        return None


def export_onnx(hardened: HardenedModel, path: str | Path | None = None,
                source: str | Path | None = None, target: str = "default") -> ExportResult:
    """Export, compare onnxruntime with the Python side on the bundle's held-out inputs, then write.

    ``target`` "portable": float32 throughout (:mod:`harden.export.portable`), parity re-checked the same way."""
    if target not in TARGETS:
        raise HardenError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    golden = hardened.golden
    if not golden:
        raise HardenError("the hardened model carries no reference outputs to check the export against")
    torch_parity = compare(golden, hardened.run(golden["input"]), "torch (bundle round trip)")
    model = build_onnx(hardened, source)
    if target == "portable":
        model, _ = float32_throughout(model)
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            "harden.target": target})
        onnx.checker.check_model(model)
    data = model.SerializeToString()
    what = "onnxruntime" if target == "default" else f"--target {target} (float32 throughout): onnxruntime"
    parity = compare(golden, OnnxGraph(data).run(golden["input"]), what,
                     rounding_of(golden, _float64_reference(hardened, golden["input"])),
                     score_tolerance=PORTABLE_SCORE_TOLERANCE if target == "portable" else None)
    if path is not None:
        atomic_write_bytes(Path(path), data, inputs=[source])
    return ExportResult(model, parity, torch_parity, Path(path) if path else None)
