"""onnxruntime against the Python side: the comparison lives in :mod:`harden.core.parity` (bundles use it too)."""

from harden.core.parity import (  # noqa: F401
    RELATIVE_TOLERANCE,
    ROUNDING_FACTOR,
    ParityReport,
    compare,
    rounding_of,
    tolerance_of,
)
