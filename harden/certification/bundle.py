"""A bundle's certificates: its CTT traps as the exported alarm sees them, certified on a split over an eps grid."""

from __future__ import annotations

import math
from typing import Callable

from harden.bounds.crown import check_method
from harden.bundle.data import SPLITS, bundle_data, split_of
from harden.certification.certify import BOUND_LABELS, Trap, certify_samples, check_certificates
from harden.core.arguments import check_choice, check_count, check_eps, check_limit
from harden.errors import HardenError
from harden.instrumentation.hardened import HardenedModel, original_classifier


def ctt_traps(hardened: HardenedModel) -> list[Trap]:
    """The CTT traps as the exported alarm sees them: each neuron's T shifted by its method's calibrated threshold.

    A CTT method alarms when max_i (x_i - T_i) / s_i > t (s_i = 1 unless the head is scaled), i.e. when some
    x_i > T_i + t s_i.
    """
    traps = []
    for method in hardened.methods:
        if not method.name.startswith("ctt-"):
            continue
        shift = float(hardened.facts["thresholds"][method.name])
        for i, site in enumerate(method.sites):
            indices, _ = method.head.trap(i)
            traps.append(Trap(site, indices.clone(), method.head.alarm_thresholds(i, shift).clone()))
    return traps


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
                   progress: Callable[[str, float], None] = lambda m, f: None) -> dict:
    """Placement, robust and detect-or-robust certificates (hardened vs original), and the sampling check.

    ``bounds``: ``ibp`` (interval), ``crown-ibp`` (backward linear-relaxation margin on interval intermediates)
    or ``crown`` (backward linear relaxation throughout; tightest, slowest).
    """
    check_method(bounds)
    check_certify_arguments(eps, split, limit, check)
    input_range = tuple(manifest["input"]["range"])
    eps_list = [check_eps(value, input_range) for value in (list(eps) if eps else [float(manifest.get("eps") or 3e-3)])]
    part = split_of(bundle_data(manifest, data), split)
    x, y = part.x, part.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    traps = ctt_traps(hardened)
    gm, original = hardened.classifier, original_classifier(hardened)
    k = manifest["policy"]["k"]
    report = {
        "samples": len(x), "split": split, "bounds": BOUND_LABELS[bounds], "bound_method": bounds,
        "policy": manifest["policy"]["text"],
        "traps": [{"site": t.node, "neurons": int(t.flat_indices.numel())} for t in traps],
        "note": ("the detect-or-robust certificate concerns the CTT alarm; under policy 'any' the combined "
                 "alarm fires whenever the CTT alarm does" if k == 1 else
                 "the detect-or-robust certificate concerns the CTT alarm only: under this policy the combined "
                 "alarm needs other methods to agree"),
        "results": {}, "check": {} if check else None, "interval_only": [],
    }
    steps = len(eps_list) * (3 if check else 2)
    done = 0
    for value in eps_list:
        text = f"{value:g}"
        progress(f"eps {text}: bounds of the hardened model", done / steps)
        hardened_cert = certify_samples(gm, traps, x, y, value, input_range, bounds=bounds,
                                        with_placement=bool(traps))
        place = hardened_cert.get("placement", [])
        done += 1
        progress(f"eps {text}: bounds of the original model", done / steps)
        original_cert = certify_samples(original, [], x, y, value, input_range, bounds=bounds)
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
            progress(f"eps {text}: {check} points per box through the real model", done / steps)
            results = [check_certificates(gm, traps, x, y, value, input_range, check, seed, bounds=bounds)]
            if original is not gm:
                results.append(check_certificates(original, [], x, y, value, input_range, check, seed, bounds=bounds))
            merged = {"points": sum(r.points for r in results), "violations": sum(r.violations for r in results),
                      "examples": [e for r in results for e in r.to_dict()["examples"]]}
            report["check"][text] = merged
            done += 1
    return report
