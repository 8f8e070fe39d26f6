"""SafetyNet's adaptive surrogate (paper 004, section 3): sigmoid codes and a wider RBF kernel.

The hard code counts how many of a unit's thresholds ``t >= 0`` its value
exceeds.  The surrogate reads the unit *before* its ReLU where it can: for
``t >= 0``, ``relu(z) > t`` exactly when ``z > t``, and max-pooling commutes
with ReLU, so the exact code is unchanged while the smoothed one,
``sigmoid((z - t) / w)``, also has a gradient for units the ReLU has switched
off (a switched-off unit's code is half the binary signal).  ``w`` is
``temperature`` times the unit's mean positive value on the attacked inputs.
Mean-pooled sites and ReLU6 sites keep the activation itself.

The score is the RBF SVM's decision function with the support vectors, dual
coefficients, gamma and scaler read back from the detector's ONNX graph (so a
loaded bundle works); the smoothed score divides gamma by ``widen``, which
keeps far-away support vectors in reach of the gradient.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from harden.methods.surrogates import Knowledge, register_surrogate
from harden.errors import HardenError
from harden.graph.ops import canonical_op
from harden.methods.safetynet import NAME

DEFAULT_TEMPERATURE = 0.1
DEFAULT_WIDEN = 10.0
PRE_ACTIVATION_REDUCTIONS = ("none", "grid", "max")   # those that commute with ReLU


def svm_parameters(detector) -> dict[str, torch.Tensor]:
    """The RBF SVM's constants (float64), from the detector's ONNX initializers ``svm_*``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(detector.onnx_model())
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if "svm_sv_t" not in inits:
        raise HardenError("the adaptive attack needs SafetyNet's RBF SVM graph (svm_* initializers); "
                          "re-instrument the bundle with this version")
    return {k[len("svm_"):]: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in inits.items()
            if k.startswith("svm_") and v.dtype != np.int64}


@register_surrogate(NAME)
class SafetyNetSurrogate:
    keyed = False   # the key only seeds sample subsets: the key-unknown attacker has the same model
    def __init__(self, hardened, method, knowledge: Knowledge):
        settings = knowledge.settings   # SafetyNet's key only seeds sample subsets: both attackers know the detector
        self.head = method.head
        self.temperature = float(settings.get("temperature", DEFAULT_TEMPERATURE))
        self.widen = float(settings.get("widen", DEFAULT_WIDEN))
        if not (self.temperature > 0 and self.widen > 0):
            raise HardenError(f"safetynet surrogate: temperature and widen must be positive; "
                              f"got {self.temperature}, {self.widen}")
        gm = hardened.classifier
        nodes = {n.name: n for n in gm.graph.nodes}
        self.nodes = []
        for i, site in enumerate(method.head_inputs):
            node = nodes[site]
            before = node.args[0] if node.args else None
            commutes = canonical_op(gm, node) == "relu" and self.head.reduce[i] in PRE_ACTIVATION_REDUCTIONS
            self.nodes.append(before.name if commutes and hasattr(before, "name") else site)
        self.svm = svm_parameters(method.detector)
        self.rectified = list(method.config.get("rectified", [True] * len(method.head_inputs)))
        self.unit_scale: list[torch.Tensor] = []

    def _reduced(self, i: int, value: torch.Tensor) -> torch.Tensor:
        return self.head.reduced(i, value).double()

    def prepare(self, acts: list[torch.Tensor]) -> None:
        self.unit_scale = []
        for i, a in enumerate(acts):
            r = self._reduced(i, a)
            if not self.rectified[i]:   # no inactive value: the scale of its values either side of 0
                r = r.abs()
            positive = (r > 0).double()
            mean = (r * positive).sum(0) / positive.sum(0).clamp_min(1)
            fallback = mean[mean > 0].mean() if bool((mean > 0).any()) else torch.tensor(1.0, dtype=torch.float64)
            self.unit_scale.append(torch.where(mean > 0, mean, fallback))

    def codes(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        parts = []
        for i, a in enumerate(acts):
            thresholds = getattr(self.head, f"thresholds_{i}").double()   # [levels, D]
            r = self._reduced(i, a).unsqueeze(1)                          # [N, 1, D]
            if smooth:
                width = (self.temperature * self.unit_scale[i]).clamp_min(1e-6)
                ramp = self.head.ramps[i]
                if ramp > 0:
                    # the head's ramp clamp(z / ramp, 0, 1) with softplus corners; a sigmoid where width >> ramp
                    z = r - thresholds
                    soft = width * (F.softplus(z / width) - F.softplus((z - ramp) / width)) / ramp
                else:
                    soft = torch.sigmoid((r - thresholds) / width)
                parts.append(soft.sum(1))
            else:
                parts.append(self.head.code_of(i, r.squeeze(1)))
        return torch.cat(parts, dim=1)

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        if not self.unit_scale and smooth:
            raise RuntimeError("prepare() first")
        p = self.svm
        z = self.codes(acts, smooth)
        if "mean" in p:
            z = (z - p["mean"]) / p["scale"]
        sv_t = p["sv_t"]
        d2 = (z * z).sum(1, keepdim=True) + (sv_t * sv_t).sum(0, keepdim=True) - 2.0 * z @ sv_t
        gamma = -p["minus_gamma"] / (self.widen if smooth else 1.0)
        return (torch.exp(-gamma * d2.clamp_min(0)) @ p["dual"] + p["intercept"]).reshape(-1)
