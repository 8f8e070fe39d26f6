"""Markdown tables of suite results (the JSON of ``python -m bench.suite --out``), as docs/RESULTS.md shows them.

    python -m bench.suite.markdown out/suite/ctt-strict.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.suite.attacks import ATTACK_NAMES, LIBRARIES


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def _det(row: dict, attack: str) -> str:
    return "/".join(_pct(row["detection"].get(f"{lib}.{attack}")) for lib in LIBRARIES
                    if f"{lib}.{attack}" in row["detection"])


def method_table(label: str, block: dict) -> str:
    rows, worst = block["rows"], block["worst"]
    attacks = [a for a in ATTACK_NAMES if any(f"{lib}.{a}" in rows[0]["detection"] for lib in LIBRARIES)]
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


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        for label, block in data["methods"].items():
            settings = f" with {', '.join(data['set'])}" if data.get("set") else ""
            print(method_table(label + settings, block))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
