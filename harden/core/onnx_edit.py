"""Small edits of ONNX graphs shared by the export stage and the detector converters."""

from __future__ import annotations

import onnx


def rename_edge(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename one value everywhere it appears in the main graph."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new
