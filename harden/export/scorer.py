"""The exported graph a bundle is judged by: a given ONNX file of that bundle, or a fresh parity-checked export."""

from __future__ import annotations

from pathlib import Path

from harden.errors import HardenError
from harden.export import export_onnx
from harden.export.runtime import OnnxGraph
from harden.instrumentation.hardened import HardenedModel


def scorer_for(hardened: HardenedModel, onnx_path: Path | None, source=None) -> OnnxGraph:
    """An onnxruntime session of the exported graph: the given file, or a fresh parity-checked export."""
    if onnx_path is not None:
        graph = OnnxGraph(onnx_path)
        bundle_id = hardened.facts.get("bundle_id")
        if graph.metadata.get("harden.bundle_id") != bundle_id:
            raise HardenError(f"{onnx_path} was not exported from this bundle (bundle ids differ)")
        return graph
    result = export_onnx(hardened, None, source)
    return OnnxGraph(result.model.SerializeToString())
