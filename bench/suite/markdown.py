"""Markdown tables of suite results (the JSON of ``python -m bench.suite --out``), as docs/RESULTS.md shows them.

    python -m bench.suite.markdown out/suite/ctt-strict.json [more.json ...]

A run with ``--adaptive`` also gives one table of the adaptive attack's success, methods by pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.suite.attacks import KNOWN_ATTACKS, LIBRARIES


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def _det(row: dict, attack: str) -> str:
    return "/".join(_pct(row["detection"].get(f"{lib}.{attack}")) for lib in LIBRARIES
                    if f"{lib}.{attack}" in row["detection"])


def method_table(label: str, block: dict) -> str:
    rows, worst = block["rows"], block["worst"]
    attacks = [a for a in KNOWN_ATTACKS if any(f"{lib}.{a}" in rows[0]["detection"] for lib in LIBRARIES)]
    head = ["pair", "attack eps", "accuracy (original)", f"{rows[0]['split']} FPR / target"] + attacks + ["min AUC", "instrument s"]
    lines = [f"**{label}** ({rows[0]['split']} split; {rows[0]['n']} inputs attacked a pair; detection = % of "
             "successful adversarial examples alarmed, ART/foolbox)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        aucs = [v for v in r["auc"].values() if v is not None]
        cells = [r["pair"], f"{r['eps']:.3g}", f"{r['accuracy']:.3f} ({r['original_accuracy']:.3f})",
                 f"{100 * r['fpr']:.1f}% / {100 * r['fpr_target']:.0f}%"]
        cells += [_det(r, a) for a in attacks]
        cells += [f"{min(aucs):.3f}" if aucs else "-", f"{r['instrument_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")

    def cell(column: str, fmt) -> str:
        entry = worst.get(column)
        return f"{fmt(entry['value'])} ({entry['pair']})" if entry else "-"

    worst_cells = ["**worst**", "", cell("accuracy_drop", lambda v: f"{-v:+.3f}"),
                   cell("fpr_excess", lambda v: f"{100 * v:+.1f} pts")]
    for a in attacks:
        parts = [worst.get(f"detection:{lib}.{a}") for lib in LIBRARIES if worst.get(f"detection:{lib}.{a}")]
        worst_cells.append(" / ".join(f"{_pct(p['value'])} ({p['pair']})" for p in parts))
    worst_cells += ["", cell("instrument_seconds", lambda v: f"{v:.0f}")]
    lines.append("| " + " | ".join(worst_cells) + " |")
    for name, error in block.get("failed", {}).items():
        lines.append(f"| {name} | failed: {error} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def adaptive_table(data: dict) -> str | None:
    """Per method and pair: the undefended classifier's success / the key-known / the key-unknown attacker's."""
    blocks = {label: {r["pair"]: r["adaptive"] for r in block["rows"] if "adaptive" in r}
              for label, block in data["methods"].items()}
    blocks = {label: rows for label, rows in blocks.items() if rows}
    if not blocks:
        return None
    pairs = list(dict.fromkeys(p for rows in blocks.values() for p in rows))
    any_row = next(iter(next(iter(blocks.values())).values()))
    lines = [f"**Adaptive attack** (L-inf at each pair's eps, {any_row['steps']} steps a restart, the first "
             f"{any_row['n']} test inputs; % of correctly classified inputs fooled with no alarm in the exported "
             "graph: undefended classifier / key-known attacker / key-unknown attacker)", "",
             "| method | " + " | ".join(pairs) + " | worst |", "|" + "---|" * (len(pairs) + 2)]
    for label, rows in blocks.items():
        cells = []
        for p in pairs:
            a = rows.get(p)
            cells.append("-" if a is None else "/".join(_pct(a.get(k)) for k in ("undefended", "key_known", "key_unknown")))
        known = [(a["key_known"], p) for p, a in rows.items() if a.get("key_known") is not None]
        worst = max(known) if known else None
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(worst[0]) + ' (' + worst[1] + ')' if worst else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        for label, block in data["methods"].items():
            if not block["rows"] or not block["rows"][0]["detection"]:
                continue   # a run with --attacks "" has no detection columns
            settings = f" with {', '.join(data['set'])}" if data.get("set") else ""
            print(method_table(label + settings, block))
            print()
        adaptive = adaptive_table(data)
        if adaptive:
            print(adaptive)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
