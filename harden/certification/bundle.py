"""A bundle's certificates: its alarms (CTT traps, abstain rows) as the exported graph sees them, certified on a
split over an eps grid."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from harden.bundle.data import SPLITS, bundle_data, split_of
from harden.certification.certify import (BOUND_LABELS, AbstainAlarm, Trap, certify_samples, check_bound_method,
                                          check_certificates)
from harden.certification.flow import parse_threat
from harden.certification.sdp import certify_sdp, check_sdp
from harden.core.arguments import check_choice, check_count, check_device, check_eps, check_limit
from harden.core.registry import Registry
from harden.errors import HardenError
from harden.instrumentation.hardened import HardenedModel, original_classifier
from harden.io.lazy import first_rows


@dataclass
class CertifiedAlarms:
    """What ``harden certify`` can prove about a bundle's alarms, in the two shapes it bounds: CTT traps (each
    masked neuron's interval capped at its threshold during propagation) and abstain detectors (extra rows on the
    logits layer's input)."""

    traps: list[Trap] = field(default_factory=list)
    abstain: list[AbstainAlarm] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.traps or self.abstain)


CERTIFIED_ALARMS: Registry = Registry("certified alarm")
"""Per method name: ``(hardened, fitted method) -> CertifiedAlarms`` (its alarm as the exported graph computes it,
with the calibrated threshold); a method without an entry is not part of the detect-or-robust certificate."""


def register_certified_alarm(*method_names: str):
    def decorate(factory):
        for name in method_names:
            CERTIFIED_ALARMS.register(name)(factory)
        return factory
    return decorate


@register_certified_alarm("ctt-lite", "ctt-loose", "ctt-strict")
def _ctt_alarm(hardened: HardenedModel, method) -> CertifiedAlarms:
    """A CTT method alarms when max_i (x_i - T_i) / s_i > t (s_i = 1 unless the head is scaled), i.e. when some
    x_i > T_i + t s_i: each neuron's T shifted by its method's calibrated threshold."""
    shift = float(hardened.facts["thresholds"][method.name])
    traps = []
    for i, site in enumerate(method.sites):
        indices, _ = method.head.trap(i)
        traps.append(Trap(site, indices.clone(), method.head.alarm_thresholds(i, shift).clone()))
    return CertifiedAlarms(traps=traps)


@register_certified_alarm("abstain")
def _abstain_alarm(hardened: HardenedModel, method) -> CertifiedAlarms:
    """The abstain head alarms when (z_abs - max_k z_k - t) / s > 0 (:mod:`harden.methods.abstain`)."""
    return CertifiedAlarms(abstain=[AbstainAlarm(method.head_inputs[0], method.head,
                                                 float(hardened.facts["thresholds"][method.name]),
                                                 float(hardened.facts.get("scales", {}).get(method.name, 1.0)))])


def certified_alarms(hardened: HardenedModel) -> CertifiedAlarms:
    """Every method's certified alarm (the registry above), merged."""
    merged = CertifiedAlarms()
    for method in hardened.methods:
        if method.name in CERTIFIED_ALARMS:
            part = CERTIFIED_ALARMS.get(method.name)(hardened, method)
            merged.traps += part.traps
            merged.abstain += part.abstain
    return merged


def ctt_traps(hardened: HardenedModel) -> list[Trap]:
    """The CTT traps as the exported alarm sees them (see :func:`_ctt_alarm`)."""
    return certified_alarms(hardened).traps


def check_certify_arguments(eps, split: str, limit, check: int) -> None:
    """What certify can check before a bundle is read (--eps against the input range comes after)."""
    for value in eps or []:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise HardenError(f"--eps must be a finite number > 0, got {value!r:.40}")
    check_choice(split, SPLITS, "--split")
    check_limit(limit)
    check_count(check, "--check", 0)


def certify_bundle(hardened: HardenedModel, manifest: dict, eps: list[float] | None = None, *, data: str | None = None,
                   split: str = "test", limit: int | None = None, check: int = 0, seed: int = 0, bounds: str = "ibp",
                   threats: list[str] | None = None,
                   progress: Callable[[str, float], None] = lambda m, f: None, device: str = "cpu",
                   batch_size: int = 256) -> dict:
    """Placement, robust and detect-or-robust certificates (hardened vs original), and the sampling check.

    ``bounds``: ``ibp`` (interval), ``crown-ibp`` (backward linear-relaxation margin on interval intermediates),
    ``crown`` (backward linear relaxation throughout; tightest, slowest) or ``sdp`` (two-layer networks only).
    ``threats``: ``flow:delta=D[,tv=T]`` texts (:mod:`harden.certification.flow`) certified instead of the
    L-inf boxes of ``eps`` (``linf`` stands for those boxes); results are keyed by each threat's label.
    ``device``: where bounds and the check's points are computed (``cuda``: the models are copied there; the
    bundle's stay on the CPU).  ``batch_size``: samples bounded at once.  Under torchrun the batches are split
    across the ranks, and every rank returns the same merged report.
    """
    check_bound_method(bounds)
    check_certify_arguments(eps, split, limit, check)
    check_count(batch_size, "--batch-size", 1)
    device = check_device(device)
    input_range = tuple(manifest["input"]["range"])
    parsed = [parse_threat(t) for t in threats or []]
    if any(t is None for t in parsed) or not parsed:
        eps_list = [check_eps(value, input_range)
                    for value in (list(eps) if eps else [float(manifest.get("eps") or 3e-3)])]
    else:
        if eps:
            raise HardenError("--eps sets the L-inf box; with only flow threats, add --threat linf to certify it too")
        eps_list = []
    sets = [(f"{value:g}", value) for value in eps_list] + [(t.label(), t) for t in parsed if t is not None]
    part = split_of(bundle_data(manifest, data), split)
    x, y = first_rows(part.x, limit), part.y[:limit] if limit is not None else part.y
    alarms = certified_alarms(hardened)
    traps = alarms.traps
    gm, original = hardened.classifier, original_classifier(hardened)
    if device != "cpu":
        same = original is gm
        gm = copy.deepcopy(gm).to(device)
        original = gm if same else copy.deepcopy(original).to(device)
        y = y.to(device)
        if isinstance(x, torch.Tensor):
            x = x.to(device)   # data read on demand is moved a batch at a time
    k = manifest["policy"]["k"]
    report = {
        "samples": len(x), "split": split, "bounds": BOUND_LABELS[bounds], "bound_method": bounds,
        "policy": manifest["policy"]["text"],
        "traps": [{"site": t.node, "neurons": int(t.flat_indices.numel())} for t in traps],
        "abstain": [{"node": a.node, "threshold": a.threshold} for a in alarms.abstain],
        "note": ("the detect-or-robust certificate concerns the CTT and abstain alarms; under policy 'any' the "
                 "combined alarm fires whenever either does" if k == 1 else
                 "the detect-or-robust certificate concerns the CTT and abstain alarms only: under this policy the "
                 "combined alarm needs other methods to agree"),
        "results": {}, "check": {} if check else None, "interval_only": [],
    }
    steps = len(sets) * (3 if check else 2)
    done = 0
    for text, value in sets:
        words = _threat_words(text)
        progress(f"{words}: bounds of the hardened model", done / steps)
        if bounds == "sdp":
            hardened_cert = certify_sdp(gm, x, y, value, input_range)
        else:
            hardened_cert = certify_samples(gm, traps, x, y, value, input_range, bounds=bounds,
                                            with_placement=bool(traps), batch_size=batch_size,
                                            abstain=alarms.abstain)
        place = hardened_cert.get("placement", [])
        done += 1
        progress(f"{words}: bounds of the original model", done / steps)
        original_cert = (certify_sdp(original, x, y, value, input_range) if bounds == "sdp" else
                         certify_samples(original, [], x, y, value, input_range, bounds=bounds,
                                         batch_size=batch_size))
        report["interval_only"] = sorted(set(report["interval_only"]) | set(hardened_cert["interval_only"])
                                         | set(original_cert["interval_only"]))
        done += 1
        report["results"][text] = {
            "placement": place,
            "hardened": hardened_cert["fractions"],
            "original": original_cert["fractions"],
            "margin_method": hardened_cert["margin_method"],
        }
        if check:
            progress(f"{words}: {check} points per sample through the real model", done / steps)
            if bounds == "sdp":
                results = [check_sdp(gm, x, y, value, input_range, hardened_cert["robust"], check, seed)]
                if original is not gm:
                    results.append(check_sdp(original, x, y, value, input_range, original_cert["robust"], check, seed))
            else:
                points = min(2048, batch_size * check)   # points through the model at once: at most a batch's boxes
                results = [check_certificates(gm, traps, x, y, value, input_range, check, seed, bounds=bounds,
                                              batch_points=points, abstain=alarms.abstain)]
                if original is not gm:
                    results.append(check_certificates(original, [], x, y, value, input_range, check, seed,
                                                      bounds=bounds, batch_points=points))
                results = [r.to_dict() for r in results]
            report["check"][text] = {"points": sum(r["points"] for r in results),
                                     "violations": sum(r["violations"] for r in results),
                                     "examples": [e for r in results for e in r["examples"]]}
            done += 1
    return report


def _threat_words(key: str) -> str:
    """A results key as words: ``eps 0.1`` for an L-inf box, the threat's own label otherwise."""
    return key if key.startswith("flow") else f"eps {key}"
