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
    """The certified fractions of ``harden certify``'s report, hardened and original, along one axis: the L-inf
    eps of its box results, or (a report of flow threats only) the flow's delta, every threat with the same tv."""
    results = report["results"]
    boxes = [(float(text), text) for text in results if not text.startswith("flow")]
    if boxes:
        points, axis = boxes, "eps (L-inf box radius, input units)"
    else:
        from harden.certification.flow import parse_threat

        threats = {text: parse_threat(text) for text in results}
        budgets = {t.tv for t in threats.values()}
        if len(budgets) > 1:
            raise HardenError("--plot draws one TV budget at a time: certify the flow threats of one tv per plot")
        tv = budgets.pop() if budgets else None
        points = [(t.delta, text) for text, t in threats.items()]
        axis = "flow delta (pixels per component)" + (f", TV <= {tv:g}" if tv is not None else "")
    points.sort()
    series = {"eps": [value for value, _ in points], "axis": axis}
    for model in ("hardened", "original"):
        series[model] = {kind: [results[text][model][kind] for _, text in points]
                         for kind in ("robust", "detect_or_robust", "always_alarm")}
    return series
