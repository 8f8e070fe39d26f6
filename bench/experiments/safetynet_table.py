"""Markdown tables for docs/results/safetynet.md from safetynet_measure.py lines and `harden evaluate --adaptive --json`.

    python bench/experiments/safetynet_table.py measure.jsonl [--adaptive a.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def detection_table(lines: list[dict]) -> str:
    attacks = [row["attack"] for row in lines[0]["report"]["rows"]]
    head = ["bundle", "code", "sites", "D", "SVs", "trained on", "FPR test (1000)", "FPR (200)"] + attacks
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        c = r["config"]
        rows = {row["attack"]: row for row in r["report"]["rows"]}
        cells = [Path(r["bundle"]).stem, c["code"], ",".join(c["sites"]), str(c["features"]),
                 str(c["svm"]["support_vectors"]), ", ".join(c["attacks"]),
                 pct(r["metrics"]["test_fpr"]), pct(r["report"]["clean_fpr"])]
        for a in attacks:
            row = rows[a]
            seen = "" if a in c["attacks"] else "*"
            cells.append(f"{pct(row['detection_rate'])}{seen} / {row['roc_auc']['score']:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def attack_table(line: dict) -> str:
    out = ["| attack | accuracy under attack | originally correct | of those fooled | mean l2 | mean l-inf | parameters |",
           "|---|---|---|---|---|---|---|"]
    for row in line["report"]["rows"]:
        out.append(f"| {row['attack']} | {pct(row['accuracy'])} | {row['n_correct']} | {row['n_successful']} | "
                   f"{row['mean_l2']:.3f} | {row['mean_linf']:.3f} | {json.dumps(row['params'])} |")
    return "\n".join(out)


def adaptive_table(paths: list[Path]) -> str:
    out = ["| bundle | eps | attack | fooled | evaded | fooled AND evaded | mean l-inf |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(path.read_text())["adaptive"]
        for key, label in (("type_i", "type I (lam 0, all values)"),
                           ("type_ii", f"type II (lam {', '.join(f'{v:g}' for v in r['lams'])}; {', '.join(r['supports'])})")):
            row = r[key]
            out.append(f"| {path.stem.replace('adaptive_', '')} | {r['eps']:g} | {label} | {pct(row['fooled'])} | "
                       f"{pct(row['evaded'])} | {pct(row['success'])} | {row['mean_linf']:.3f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("measure", type=Path)
    p.add_argument("--adaptive", type=Path, nargs="*", default=[])
    args = p.parse_args()
    lines = [json.loads(line) for line in args.measure.read_text().splitlines() if line.strip()]
    print(detection_table(lines))
    print()
    print(attack_table(lines[0]))
    if args.adaptive:
        print()
        print(adaptive_table(args.adaptive))


if __name__ == "__main__":
    main()
