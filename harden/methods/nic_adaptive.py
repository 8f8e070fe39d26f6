"""NIC's adaptive surrogate: BPDA through the keyed staircase, the detector graph itself for the SVMs.

The keyed transform ``g`` (floor or ceil of ``z * scale``, divided back by the
scale) is flat almost everywhere; the smoothed head replaces it by the identity
it approximates to within one step (backward pass differentiable approximation,
Athalye et al. 2018).  The probes' softmaxes, the one-class SVMs and the final
SVM are exact: the detector's own ONNX graph run in torch
(:mod:`harden.detectors.torch_eval`), with gamma divided by ``widen`` in the
smoothed score (default 1: the exact kernel).

The key-unknown attacker knows the probes and SVMs (weights) but not the
transforms: its own check redraws them with a key of its own.
"""

from __future__ import annotations

import copy
import secrets

import torch

from harden.methods.surrogates import KEY_UNKNOWN, Knowledge, register_surrogate
from harden.detectors.torch_eval import TorchOnnx
from harden.methods.nic import NIC, _draw_transform


@register_surrogate(NIC.name)
class NICSurrogate:
    def __init__(self, hardened, method, knowledge: Knowledge):
        self.nodes = list(method.head_inputs)
        self.head = method.head
        self.smooth_head = copy.deepcopy(method.head)
        self.smooth_head.transform = False          # BPDA: the staircase's identity
        widen = float(knowledge.settings.get("widen", 1.0))
        self.detector = TorchOnnx(method.detector.onnx_model())
        self.smooth_detector = TorchOnnx(method.detector.onnx_model(), widen=widen)
        self.calibration = None
        if knowledge.attacker == KEY_UNKNOWN and self.head.transform:
            self.head = copy.deepcopy(method.head)
            guess = secrets.token_hex(16)
            for k in range(self.head.sets):
                for i, (scale, ceil) in enumerate(_draw_transform(guess, k, self.head.dims)):
                    getattr(self.head, f"scale_{k}_{i}").copy_(scale)
                    getattr(self.head, f"ceil_{k}_{i}").copy_(ceil)

    def prepare(self, acts: list[torch.Tensor]) -> None:
        pass

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        head, detector = (self.smooth_head, self.smooth_detector) if smooth else (self.head, self.detector)
        return detector(head(*acts)).reshape(-1)
