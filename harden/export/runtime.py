"""An onnxruntime session of an exported harden graph, returning the ONNX contract's outputs by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from harden.core.ort import inference_session
from harden.errors import HardenError


class OnnxGraph:
    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise HardenError(f"no ONNX file at {path}")
            model = path.read_bytes()
            _refuse_external_data(model, str(path))
        self.session = inference_session(model, "the model", threads)
        self.model_bytes = bytes(model)   # another session of the same graph (e.g. other threads) needs no re-read
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def manifest(self) -> dict:
        text = self.metadata.get("harden.manifest")
        if not text:
            return {}
        from harden.io.safezip import parse_json

        return parse_json(text.encode("utf-8"), "the ONNX file's harden.manifest")

    def run(self, x: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, max(len(x), 1), batch_size):
            outs = self.session.run(None, {self.input_name: x[start : start + batch_size]})
            for name, value in zip(self.output_names, outs):
                parts[name].append(value)
        return {k: np.concatenate(v) for k, v in parts.items()}

    __call__ = run


def _refuse_external_data(model: bytes, where: str) -> None:
    """An ONNX file may name other files to read its tensors from; a file from elsewhere must not lead harden
    to read any path (docs/SECURITY.md)."""
    try:
        proto = onnx.load_from_string(model)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others for damaged bytes
        raise HardenError(f"{where} is not a readable ONNX model ({type(exc).__name__})") from None
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    tensors.append(attribute.t)
                tensors.extend(attribute.tensors)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise HardenError(f"{where}: tensor {tensor.name!r:.60} points at an external data file; harden "
                                  "never follows a path stored inside a model")


def load_onnx_model(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise HardenError(f"{path} is not a readable ONNX file: {str(exc).splitlines()[0]}") from exc
