"""The differentiable stand-ins of detectors that adaptive attacks use, registered by method name.

Each method that can be attacked adaptively registers a factory here
(:func:`register_surrogate`); the attack itself lives in
``harden.evaluation.adaptive``.  What the attacker knows is a
:class:`Knowledge`: ``key-known`` is everything, key included; ``key-unknown``
is Kerckhoffs' attacker (method, code, weights and training data, not the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from harden.core.registry import Registry
from harden.errors import HardenError

KEY_KNOWN, KEY_UNKNOWN = "key-known", "key-unknown"
ATTACKERS = (KEY_KNOWN, KEY_UNKNOWN)


@dataclass
class Knowledge:
    """What a surrogate may use besides the bundle: who attacks, the training split, per-surrogate settings."""

    attacker: str = KEY_KNOWN
    reference: torch.Tensor | None = None      # training inputs (for statistics the key-unknown attacker computes)
    settings: dict[str, Any] = field(default_factory=dict)


class Surrogate(Protocol):
    """A differentiable stand-in for one fitted method's raw score (higher = more suspicious)."""

    nodes: list[str]   # classifier graph nodes it reads (or INPUT / LOGITS), in the order ``raw`` receives them

    def prepare(self, acts: list[torch.Tensor]) -> None:
        """Statistics from clean inputs (e.g. sigmoid widths); called once before the attack."""

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        """[N] raw score: smoothed (differentiable) or exact (the attacker's model of the shipped detector)."""


class HeadSurrogate:
    """The surrogate of a method whose head is differentiable as shipped: the head itself, smoothed or not."""

    def __init__(self, hardened, method, knowledge: Knowledge):
        self.nodes = list(method.head_inputs)
        self.head = method.head
        self.calibration = None

    def prepare(self, acts: list[torch.Tensor]) -> None:
        pass

    def raw(self, acts: list[torch.Tensor], smooth: bool) -> torch.Tensor:
        return self.head(*acts).reshape(-1)


SurrogateFactory = Callable[[Any, Any, Knowledge], Surrogate]   # (hardened model, fitted method, knowledge)
SURROGATES: Registry[SurrogateFactory] = Registry("adaptive surrogate")


def register_surrogate(*method_names: str) -> Callable[[SurrogateFactory], SurrogateFactory]:
    def decorate(factory: SurrogateFactory) -> SurrogateFactory:
        for name in method_names:
            SURROGATES.register(name)(factory)
        return factory
    return decorate


def surrogates_for(hardened, knowledge: Knowledge | dict | None = None) -> dict[str, Surrogate]:
    """A surrogate for every method of the bundle that has one; an error if none has."""
    from harden.methods import load_all  # noqa: F401  (method modules register their surrogates)

    if not isinstance(knowledge, Knowledge):
        knowledge = Knowledge(settings=dict(knowledge or {}))
    found = {m.name: SURROGATES.get(m.name)(hardened, m, knowledge) for m in hardened.methods if m.name in SURROGATES}
    if not found:
        names = ", ".join(m.name for m in hardened.methods)
        raise HardenError(f"no adaptive attack for this bundle's methods ({names}); methods with an adaptive "
                          f"surrogate: {', '.join(SURROGATES.names()) or 'none'}")
    return found
