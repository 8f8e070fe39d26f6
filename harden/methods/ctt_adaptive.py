"""CTT's adaptive surrogates: hinges on the traps.

The head's raw score is ``max_i (a_i - T_i) / s_i`` over the masked neurons, and
the method alarms when it exceeds the calibrated shift ``t``.  A max moves one
neuron per gradient step, so the smoothed score is the sum of hinges
``sum_i relu((a_i - T_i) / s_i - t)`` instead: zero exactly when no trap fires,
and every firing trap pulls at once.

The key-unknown attacker does not know which neurons are traps.  It knows the
(fine-tuned) weights and the training split, so it holds EVERY neuron of every
trap site below its natural maximum on the training split (the largest value a
trap's threshold could sit at without firing on benign data); its own check is
"no neuron above its natural maximum", and the target's exported graph judges
the result.
"""

from __future__ import annotations

import torch

from harden.methods.surrogates import KEY_UNKNOWN, Knowledge, register_surrogate
from harden.errors import HardenError

REFERENCE_ROWS = 10_000   # training inputs the key-unknown attacker takes its natural maxima from


@register_surrogate("ctt-lite", "ctt-loose", "ctt-strict")
class TrapSurrogate:
    def __init__(self, hardened, method, knowledge: Knowledge):
        self.head = method.head
        self.nodes = list(method.head_inputs)
        names = [m.name for m in hardened.methods]
        self.shift = float(hardened.policy.thresholds[names.index(method.name)])
        self.calibration = None
        if knowledge.attacker == KEY_UNKNOWN:
            if knowledge.reference is None:
                raise HardenError("the key-unknown CTT attacker needs the training split (its natural maxima)")
            self.natural_max = self._natural_max(hardened.classifier, knowledge.reference[:REFERENCE_ROWS])
            self.calibration = (0.0, 1.0)   # its own rule: alarm when any neuron exceeds its natural maximum

    def _natural_max(self, classifier, reference: torch.Tensor) -> list[torch.Tensor]:
        from harden.graph.analyse import collect

        with torch.no_grad():
            values = collect(classifier, self.nodes, reference, lambda _, a: a.amax(0, keepdim=True), batch_size=500)
        return [values[n].amax(0) for n in self.nodes]

    def prepare(self, acts: list[torch.Tensor]) -> None:
        pass

    def _excess(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.calibration is not None:
            return [a.flatten(1) - m for a, m in zip(acts, self.natural_max)]
        return [self.head.excess(i, a) for i, a in enumerate(acts)]

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        excess = self._excess(acts)
        if not smooth:
            return torch.cat(excess, dim=1).amax(dim=1)
        shift = 0.0 if self.calibration is not None else self.shift
        return sum(torch.relu(e.double() - shift).sum(1) for e in excess)
