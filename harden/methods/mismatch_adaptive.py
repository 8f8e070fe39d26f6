"""The mismatch detector's adaptive surrogate: the second model and the SVC, exactly as shipped.

Both softmaxes are smooth, and the SVC is the detector's own ONNX graph run in
torch (:mod:`harden.detectors.torch_eval`); ``widen`` divides its gamma in the
smoothed score (default 1: the exact kernel).  The keyed part is the second
model itself (trained from the key's seed, or the user's own): an attacker
without the key has to train its own, which is what a *proxy* bundle is
(``harden evaluate --adaptive-proxy``: the same classifier instrumented with
another key).
"""

from __future__ import annotations

import torch

from harden.methods.surrogates import KEY_UNKNOWN, Knowledge, register_surrogate
from harden.detectors.torch_eval import TorchOnnx
from harden.errors import HardenError
from harden.methods.mismatch import Mismatch


@register_surrogate(Mismatch.name)
class MismatchSurrogate:
    def __init__(self, hardened, method, knowledge: Knowledge):
        if knowledge.attacker == KEY_UNKNOWN:
            raise HardenError("a key-unknown attacker of mismatch needs its own second model: pass --adaptive-proxy "
                              "(the same classifier instrumented with --method mismatch and another --key)")
        self.nodes = list(method.head_inputs)
        self.head = method.head
        self.detector = TorchOnnx(method.detector.onnx_model())
        self.smooth_detector = TorchOnnx(method.detector.onnx_model(), widen=float(knowledge.settings.get("widen", 1.0)))
        self.calibration = None

    def prepare(self, acts: list[torch.Tensor]) -> None:
        pass

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        return (self.smooth_detector if smooth else self.detector)(self.head(*acts)).reshape(-1)
