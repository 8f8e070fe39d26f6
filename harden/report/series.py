"""Curves read off the evaluation's and the certificates' JSON, for the plots and the tables alike."""

from __future__ import annotations

from harden.attacks.catalog import AttackSpec, parse_attack
from harden.errors import HardenError


def _eps_groups(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """Attacks run at two or more eps with every other parameter equal, in the order they first appear."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        params = row.get("params") or {}
        if "eps" not in params:
            continue
        try:
            spec = parse_attack(row["attack"])
        except HardenError:   # a given adversarial set's label, not an attack
            continue
        title = AttackSpec(spec.name, {k: v for k, v in spec.params.items() if k != "eps"}).label()
        groups.setdefault(title, []).append((float(params["eps"]), row["attack"]))
    return [(title, [label for _, label in sorted(points)])
            for title, points in groups.items() if len({eps for eps, _ in points}) >= 2]


def strength_series(rows: list[dict], groups: list[tuple[str, list[str]]] | None = None) -> list[dict]:
    """Per attack, its rows in eps order: accuracy under attack, detection (originally correct), detection of the
    successful ones, and each method's detection.  ``groups``: (title, row labels) pairs; None finds every attack
    run at several eps."""
    by_label = {row["attack"]: row for row in rows}
    out = []
    for title, labels in (groups if groups is not None else _eps_groups(rows)):
        chosen = [by_label[label] for label in labels]
        methods = sorted({m for row in chosen for m in row.get("per_method_detection", {})})
        out.append({
            "attack": title,
            "labels": list(labels),
            "eps": [float(row["params"]["eps"]) for row in chosen],
            "accuracy": [row["accuracy"] for row in chosen],
            "detection_rate": [row["detection_rate"] for row in chosen],
            "detection_rate_successful": [row["detection_rate_successful"] for row in chosen],
            "per_method_detection": {m: [row["per_method_detection"].get(m) for row in chosen] for m in methods},
        })
    return out


def certified_series(report: dict) -> dict:
    """The certified fractions of ``harden certify``'s report in eps order, hardened and original."""
    items = sorted(report["results"].items(), key=lambda item: float(item[0]))
    series = {"eps": [float(text) for text, _ in items]}
    for model in ("hardened", "original"):
        series[model] = {kind: [result[model][kind] for _, result in items]
                         for kind in ("robust", "detect_or_robust", "always_alarm")}
    return series
