"""Merge the torch graph, the scikit-learn detectors and the policy into one ONNX model."""

from __future__ import annotations

import onnx
import onnx.compose

from harden.core.onnx_edit import rename_edge
from harden.core.opsets import IR_VERSION


def prefixed(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """Internal names prefixed so merged graphs cannot collide; interface names kept."""
    interface = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    out = onnx.compose.add_prefix(model, prefix)
    for name in interface:
        rename_edge(out, prefix + name, name)
    return out


def _align_opsets(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    versions: dict[str, int] = {}
    for model in (a, b):
        for entry in model.opset_import:
            versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    for model in (a, b):
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
        model.ir_version = IR_VERSION


def dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """One opset import per domain (the highest), "ai.onnx" spelled "" : ``onnx.compose.merge_models`` lists the
    default domain once per merged model, and onnxruntime's quantiser then refuses the model ("Failed to find
    proper ai.onnx domain")."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    return model


def connect(first: onnx.ModelProto, second: onnx.ModelProto, io_map: list[tuple[str, str]],
            outputs: list[str]) -> onnx.ModelProto:
    """``second`` fed by ``first``'s outputs; the merged model exposes ``outputs``."""
    _align_opsets(first, second)
    return dedupe_opsets(onnx.compose.merge_models(first, second, io_map=io_map, outputs=outputs))
