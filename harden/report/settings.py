"""What a report measures: its attacks, eps grids, sample counts and latency runs, each with its default, checked
against the bundle before any work starts.

Light on purpose (the attack catalogue is imported when a plan is made): the CLI's help text reads the defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from harden.attacks.defaults import DEFAULT_ATTACKS
from harden.errors import HardenError

# Default grids, as fractions of the input range's width (the eps of an attack or a box is in input units).
STRENGTH_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
CERTIFY_FRACTIONS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03)
STRENGTH_ATTACKS = ("fgsm", "pgd")


@dataclass(frozen=True)
class ReportSettings:
    attacks: tuple[str, ...] = DEFAULT_ATTACKS            # the ROC section's attacks (as ``harden evaluate --attack``)
    strength_attacks: tuple[str, ...] = STRENGTH_ATTACKS   # attacked at every strength eps (``name[:param=value,...]``, no eps)
    strength_eps: tuple[float, ...] = ()                  # () -> STRENGTH_FRACTIONS x the input range's width
    certify_eps: tuple[float, ...] = ()                   # () -> CERTIFY_FRACTIONS x width, plus the bundle's own eps
    certify_limit: int = 200                              # samples certified per eps
    bounds: str = "ibp"                                   # as ``harden certify --bounds``
    data: str | None = None                               # None: the bundle's data, split as it was
    split: str = "test"
    limit: int = 500                                      # inputs attacked (the first of the split)
    seed: int = 0
    latency_threads: int = 1                              # onnxruntime intra-op threads for both graphs
    latency_rounds: int = 100                             # timed calls at batch 1 (a quarter at batch 256)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The settings resolved for one bundle: every attack label to run, grouped by the section that shows it."""

    roc_attacks: list[str]
    strength: list[dict]            # {"attack": text, "labels": [...], "eps": [...]} per strength attack
    certify_eps: list[float]

    @property
    def attack_labels(self) -> list[str]:
        """Each attack once, in the order the sections show them (a label two sections share runs once)."""
        labels = list(self.roc_attacks) + [label for s in self.strength for label in s["labels"]]
        return list(dict.fromkeys(labels))


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise HardenError(f"{name} must be >= 1; got {value}")


def _eps_list(option: str, values) -> list[float]:
    out = []
    for value in values:
        if not value > 0:
            raise HardenError(f"{option} must be > 0; got {value:g}")
        out.append(float(value))
    return sorted(set(out))


def _strength_series(text: str, eps: list[float]) -> dict:
    from harden.attacks.catalog import ATTACKS, AttackSpec, parse_attack

    spec = parse_attack(text)
    names = [p.name for p in ATTACKS.get(spec.name).params]
    if "eps" not in names:
        raise HardenError(f"--strength-attack {text!r}: {spec.name} has no eps parameter to vary")
    if "eps" in spec.params:
        raise HardenError(f"--strength-attack {text!r}: eps comes from --strength-eps; name the attack without it")
    labels = []
    for value in eps:
        label = AttackSpec(spec.name, {**spec.params, "eps": value}).label()
        parse_attack(label)   # derived defaults (e.g. a step from eps) checked now, not after an hour of attacks
        labels.append(label)
    return {"attack": spec.label(), "labels": labels, "eps": eps}


def plan(settings: ReportSettings, manifest: dict) -> Plan:
    """Every setting checked and the grids resolved for this bundle's input range; one line on the first problem."""
    from harden.attacks.catalog import parse_attack
    from harden.bounds.crown import check_method
    from harden.bundle.data import SPLITS

    check_method(settings.bounds)
    if settings.split not in SPLITS:
        raise HardenError(f"--split {settings.split!r} is not one of {', '.join(SPLITS)}")
    for name, value in (("--limit", settings.limit), ("--certify-limit", settings.certify_limit),
                        ("--latency-threads", settings.latency_threads), ("--latency-rounds", settings.latency_rounds)):
        _positive(name, value)
    lo, hi = manifest["input"]["range"]
    width = float(hi) - float(lo)
    roc_attacks = [parse_attack(a).label() for a in settings.attacks]
    strength_eps = _eps_list("--strength-eps", settings.strength_eps or [f * width for f in STRENGTH_FRACTIONS])
    strength = [_strength_series(text, strength_eps) for text in settings.strength_attacks]
    default_certify = [f * width for f in CERTIFY_FRACTIONS] + ([manifest["eps"]] if manifest.get("eps") else [])
    certify_eps = _eps_list("--certify-eps", settings.certify_eps or default_certify)
    return Plan(roc_attacks=roc_attacks, strength=strength, certify_eps=certify_eps)
