"""torch.onnx.export (the torch.export-based exporter) of a module with named inputs and outputs."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from harden.errors import HardenError

from harden.core.opsets import IR_VERSION, OPSET


_REGISTRIES: dict = {}


@contextlib.contextmanager
def _registry_once():
    """The exporter rebuilds its table of ATen -> ONNX functions from torchlib on every call (about 4 s on this
    class of CPU, most of a small model's export): keep one per opset for the process, during harden's calls
    only.  harden passes no custom translations, so the table is never changed."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:   # another torch layout: export as it is
        yield
        return
    original = _registration.ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def cached(cls, opset_version=None, **kwargs):
        key = (cls, opset_version, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            args = {} if opset_version is None else {"opset_version": opset_version}
            _REGISTRIES[key] = original.__func__(cls, **args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warnings for every call; harden shows its own progress."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def export_module(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    varargs_after: int | None = None,
) -> onnx.ModelProto:
    """An ONNX model of ``module`` with a dynamic batch dimension on every input."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in example)
    if varargs_after is not None:  # forward(a, *rest): torch.export wants the rest as one nested tuple
        dynamic = (*dynamic[:varargs_after], dynamic[varargs_after:])
    try:
        with _quiet(), _registry_once():
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HardenError(f"torch.onnx.export failed: {first}") from exc
    model = program.model_proto
    model.ir_version = IR_VERSION
    return model
