"""What a detection method is to the rest of harden, and the registry of methods by CLI name.

A method is fitted once (``Method.fit``) into a :class:`FittedMethod`: a torch
*head* inserted into the classifier's graph after the method's sites, and
optionally a scikit-learn *detector* (already converted to ONNX) that turns
the head's features into a raw score.  Every raw score means "higher is more
suspicious"; thresholds are set later by calibration, never by the method.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from harden.core.options import OptionSet, option
from harden.errors import HardenError
from harden.io.data import Dataset
from harden.core.registry import Registry

INPUT = "@input"    # head argument: the model's input tensor
LOGITS = "@logits"  # head argument: the classifier's logits


@dataclass
class Options:
    """The settings every method shares (the CLI's flags); each method's own options are its :class:`OptionSet`."""

    key: str = "0"
    seed: int = 0
    fpr: float = 0.02
    fpr_confidence: float = 0.9   # P(true FPR on new data <= fpr); 0 = the plain empirical quantile
    device: str = "cpu"
    trust_pickle: bool = False    # a method that loads a model of the user's (mismatch) may unpickle it

    def check(self) -> "Options":
        """The shared settings in their valid ranges (one HardenError line naming the flag); each method's own
        options are checked by its OptionSet."""
        from harden.core.arguments import check_device, check_fpr, check_key

        check_key(self.key)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HardenError(f"--seed must be a whole number, got {self.seed!r:.40}")
        check_fpr(self.fpr)
        confidence = self.fpr_confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 <= confidence < 1.0:
            raise HardenError(f"--fpr-confidence must lie in [0, 1), got {confidence!r:.40}")
        self.device = check_device(self.device)
        return self


def layers_option(default: str) -> Any:
    """The ``layers`` option of a method that instruments sites."""
    return option(default, "sites to instrument: all | last:K (the last K in graph order) | deepest:K (the same, "
                           "or every site when there are fewer) | [name,name] (node names or module paths; "
                           "`harden layers` lists them)")


class NoOptions(OptionSet):
    """A method without options of its own."""


@dataclass
class FitContext:
    gm: fx.GraphModule          # the traced classifier (may be fine-tuned in place by a method)
    data: Dataset
    options: Options
    settings: OptionSet = field(default_factory=NoOptions)   # this method's own options, parsed and checked
    progress: Callable[[str, float], None] = lambda message, fraction: None


class Detector(Protocol):
    """The scikit-learn half of a method, as ONNX: features -> raw score."""

    def score(self, features: np.ndarray) -> np.ndarray: ...

    def onnx_model(self) -> bytes: ...


@dataclass
class FittedMethod:
    name: str
    config: dict[str, Any]            # JSON: everything needed to rebuild the head, plus facts for the manifest
    head: nn.Module                   # returns the raw score [N] (no detector) or features [N, D]
    head_inputs: list[str]            # node names, INPUT or LOGITS
    detector: Detector | None = None
    sites: list[str] = field(default_factory=list)

    @property
    def feature_output(self) -> str:
        return f"{self.name}.features" if self.detector is not None else f"{self.name}.raw"


class Method:
    """Base class: subclasses set ``name`` (and ``option_set``, their options) and implement ``fit`` and ``build_head``."""

    name: ClassVar[str]
    finetunes: ClassVar[bool] = False
    option_set: ClassVar[type[OptionSet]] = NoOptions

    def fit(self, ctx: FitContext) -> FittedMethod:
        raise NotImplementedError

    @classmethod
    def build_head(cls, config: dict[str, Any]) -> nn.Module:
        """An untrained head with the right shapes; the bundle then loads its state_dict."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.register(cls.name)(cls)
    return cls


@dataclass(frozen=True)
class MethodSpec:
    """A method by name with its options parsed and checked."""

    name: str
    settings: OptionSet

    def label(self) -> str:
        """``name:key=value,...`` of the options that differ from the defaults (parses back to this spec)."""
        return self.settings.label(self.name)

    @classmethod
    def of(cls, name: str, **options: Any) -> "MethodSpec":
        """From Python values: ``MethodSpec.of("ctt-strict", eps=0.003, steps=200)``."""
        from harden.methods import load_all  # noqa: F401  (registers every method, whatever the caller imported)

        method = METHODS.get(name)
        return cls(method.name, method.option_set.parse(f"method {method.name!r}", options))


def parse_method(spec: "str | MethodSpec") -> MethodSpec:
    """``name`` or ``name:key=value,...`` (the CLI's --method) -> a checked :class:`MethodSpec`."""
    if isinstance(spec, MethodSpec):
        return spec
    from harden.core.options import split_spec

    name, given = split_spec(spec, "method")
    method = METHODS.get(name)
    return MethodSpec(method.name, method.option_set.parse(f"method {method.name!r}", given))


def key_seed(key: str, purpose: str) -> int:
    """A 63-bit seed derived from the user's key; different purposes give independent streams."""
    digest = hashlib.sha256(f"harden:{purpose}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def key_fingerprint(key: str) -> str:
    """Identifies a key without revealing it (a salted hash, 16 hex digits)."""
    return hashlib.sha256(f"harden-key-fingerprint:{key}".encode()).hexdigest()[:16]


def select_sites(site_names: list[str], paths: dict[str, str], spec: str) -> list[str]:
    """Resolve a method's ``layers`` option: ``all | last:K | deepest:K | name,name`` (names may be node names or
    module paths).  ``last:K`` is the last K sites in graph order and needs that many; ``deepest:K`` the same, or
    every site when the model has fewer."""
    spec = spec.strip()
    if not site_names:
        raise HardenError("the model has no element-wise activation (ReLU, GELU, SiLU, hardswish, sigmoid, ...) "
                          "to instrument")
    if spec == "all":
        return list(site_names)
    for form in ("last", "deepest"):
        if spec.startswith(form + ":"):
            try:
                k = int(spec.split(":", 1)[1])
            except ValueError:
                raise HardenError(f"layers {spec!r}: {form}:K needs a whole number K") from None
            if k < 1:
                raise HardenError(f"layers {spec!r}: K must be at least 1")
            if form == "last" and k > len(site_names):
                raise HardenError(f"layers {spec!r}: the model has only {len(site_names)} site(s): "
                                  f"{', '.join(site_names)}")
            return list(site_names[-k:])
    by_path = {}
    for name in site_names:
        by_path.setdefault(paths[name], []).append(name)
    chosen = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in site_names:
            chosen.append(part)
        elif part in by_path and len(by_path[part]) == 1:
            chosen.append(by_path[part][0])
        elif part in by_path:
            raise HardenError(f"layers: module {part!r} is called at several nodes ({', '.join(by_path[part])}); name one")
        else:
            raise HardenError(f"layers: {part!r} is not a site; sites are: {', '.join(site_names)}")
    if not chosen:
        raise HardenError("layers selects no site")
    return list(dict.fromkeys(chosen))


def tensor_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_arrays(module: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HardenError(f"bundle state does not fit the head: missing {missing}, unexpected {unexpected}")
    return module
