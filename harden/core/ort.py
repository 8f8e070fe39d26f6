"""onnxruntime sessions as harden opens them: quiet, and one HardenError line for a model it refuses."""

from __future__ import annotations

import contextlib
import io

import onnxruntime as ort

from harden.errors import HardenError

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cuda_available() -> bool:
    """Whether this onnxruntime build has the CUDA execution provider."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def inference_session(model: bytes, what: str, threads: int | None = None, *, optimization: str = "all",
                      device: str = "cpu") -> ort.InferenceSession:
    """A session of ``model``.  ``optimization``: onnxruntime's graph optimisation level (disable | basic |
    extended | all); ``device``: cpu, or cuda (onnxruntime's CUDA provider, which must be installed).
    onnxruntime's own prints (its "EP Error ... Falling back" banner goes to stdout) and C++ log lines below
    errors are kept off the terminal."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimization not in OPTIMIZATION_LEVELS:
        raise HardenError(f"optimisation level {optimization!r} is not one of {', '.join(OPTIMIZATION_LEVELS)}")
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if str(device).startswith("cuda"):
        if not cuda_available():
            raise HardenError("onnxruntime has no CUDA provider here: install onnxruntime-gpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a model it refuses
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise HardenError(f"onnxruntime cannot load {what}: {text}") from None
