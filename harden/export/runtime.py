"""An onnxruntime session of an exported harden graph, returning the ONNX contract's outputs by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from harden.errors import HardenError


class OnnxGraph:
    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise HardenError(f"no ONNX file at {path}")
            model = path.read_bytes()
        self.model_bytes = bytes(model)   # another session of the same graph (e.g. other threads) needs no re-read
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise HardenError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def manifest(self) -> dict:
        text = self.metadata.get("harden.manifest")
        return json.loads(text) if text else {}

    def run(self, x: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, max(len(x), 1), batch_size):
            outs = self.session.run(None, {self.input_name: x[start : start + batch_size]})
            for name, value in zip(self.output_names, outs):
                parts[name].append(value)
        return {k: np.concatenate(v) for k, v in parts.items()}

    __call__ = run


def load_onnx_model(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise HardenError(f"{path} is not a readable ONNX file: {str(exc).splitlines()[0]}") from exc
