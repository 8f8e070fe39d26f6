"""onnxruntime against the Python side: the comparison lives in :mod:`harden.core.parity` (bundles use it too)."""

from harden.core.parity import TIE_TOLERANCE, VALUE_TOLERANCE, ParityReport, compare  # noqa: F401
