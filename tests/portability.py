"""One check every method's tests run: the exported graph as a deployer meets it, at every onnxruntime graph
optimisation level, in the default and the portable (float32 throughout) target, and the portable graph
converted to float16 (onnxconverter-common, float32 inputs and outputs kept)."""

from __future__ import annotations

import collections

import numpy as np

from harden.export import build_onnx
from harden.export.parity import compare
from harden.export.portable import PORTABLE_SCORE_TOLERANCE, float32_throughout, float64_places
from harden.export.runtime import OPTIMIZATION_LEVELS, OnnxGraph


def float16(model):
    """The float16 conversion a deployer runs: onnxconverter-common with the float32 inputs and outputs kept."""
    import warnings

    from onnxconverter_common import float16 as converter

    with warnings.catch_warnings():   # it warns about every constant below float16's range
        warnings.simplefilter("ignore")
        return converter.convert_float_to_float16(model, keep_io_types=True)


def check_every_runtime_setting(hardened) -> None:
    golden = hardened.golden
    finite = np.isfinite(golden["input"].reshape(len(golden["input"]), -1)).all(axis=1)
    assert (~finite).sum() >= 2   # the NaN and the inf row
    default = build_onnx(hardened)
    portable, _ = float32_throughout(default)
    assert float64_places(portable) == 0
    for target, model, tolerance in (("default", default, None), ("portable", portable, PORTABLE_SCORE_TOLERANCE)):
        domains = [o.domain for o in model.opset_import]
        assert len(domains) == len(set(domains)), f"{target}: opset imported twice: {model.opset_import}"
        ops = collections.Counter(n.op_type for n in model.graph.node)
        assert "IsInf" not in ops   # no float16 kernel before opset 20; edge converters trip on it
        data = model.SerializeToString()
        for level in OPTIMIZATION_LEVELS:
            out = OnnxGraph(data, optimization=level).run(golden["input"])
            # raises on any disagreement: logits within 1e-4, alarms identical but for ties at a threshold
            compare(golden, out, f"{target} at optimisation level {level}", score_tolerance=tolerance)
            for name in hardened.policy_output_names():
                if name.endswith("alarm"):
                    assert out[name][~finite].all(), f"{target}/{level}: {name} quiet on a non-finite row"
    # float16: loads and runs in onnxruntime, and every alarm still fires on the NaN and inf rows
    out = OnnxGraph(float16(portable).SerializeToString()).run(golden["input"])
    assert out["logits"].shape == golden["logits"].shape
    for name in hardened.policy_output_names():
        if name.endswith("alarm"):
            assert out[name][~finite].all(), f"float16: {name} quiet on a non-finite row"
