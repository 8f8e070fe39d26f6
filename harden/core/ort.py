"""onnxruntime sessions as harden opens them: CPU, quiet, and one HardenError line for a model it refuses."""

from __future__ import annotations

import contextlib
import io

import onnxruntime as ort

from harden.errors import HardenError


def inference_session(model: bytes, what: str, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session of ``model``.  onnxruntime's own prints (its "EP Error ... Falling back" banner goes to
    stdout) and C++ log lines below errors are kept off the terminal."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a model it refuses
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise HardenError(f"onnxruntime cannot load {what}: {text}") from None
