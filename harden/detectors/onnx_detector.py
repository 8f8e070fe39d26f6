"""A detector held as ONNX only (as loaded from a bundle): scored through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class OnnxDetector:
    def __init__(self, model: bytes):
        self._model = model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def score(self, features: np.ndarray) -> np.ndarray:
        (raw,) = self._session.run(None, {self._input: np.ascontiguousarray(features, dtype=np.float32)})
        return raw.reshape(-1)

    def onnx_model(self) -> bytes:
        return self._model
