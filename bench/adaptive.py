"""The adaptive-attack table of the main job: every method on the example LeNet-5 and the bundled MNIST.

    OMP_NUM_THREADS=1 python bench/adaptive.py [--limit 200] [--out out/adaptive/table.json]

Each configuration is instrumented through the CLI (cached in out/adaptive/ once made), exported, and attacked
with ``harden evaluate --adaptive`` at L-inf 0.1, L-inf 0.3 and L2 2.0 (the budgets of the independent
evaluation in the issue that asked for this table).  Per budget it reports the undefended classifier's success
(type I, lam 0: "fooled"; for a fine-tuned classifier also the original weights'), the key-known attacker's success (fooled and no alarm in the exported graph) and the
key-unknown attacker's: the built-in one (CTT: every neuron of the trap sites held below its natural maximum;
NIC: its own transforms) and, for the keyed methods, transfer from a proxy bundle instrumented with another key.
Prints one JSON document; ``--out`` also writes it.  ``--markdown FILE.json`` prints that document's table as
docs/results/adaptive.md shows it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARDEN = [sys.executable, "-m", "harden.cli.app"]
BASE = ["out/lenet5_mnist.pt", "--arch", "harden.examples.lenet:LeNet5", "--data", "mnist"]
KEY, PROXY_KEY = "readme-demo-key", "adaptive-proxy-key"
SN = ["--method", "safetynet:layers=all,code=quaternary"]
CONFIGS = {   # the main job's method, the four others, and lan
    "ctt-strict": (["--method", "ctt-strict"], True),
    "safetynet": (SN, False),
    "nic": (["--method", "nic", "--fpr", "0.05"], True),
    "mismatch": (["--method", "mismatch:train_second=true", "--fpr", "0.05"], True),
    "ctt-strict+safetynet": (["--method", "ctt-strict", *SN, "--policy", "any"], True),
    "lan": (["--method", "lan", "--fpr", "0.05"], True),
}
BUDGETS = (("linf", 0.1), ("linf", 0.3), ("l2", 2.0))


def run(args: list[str]) -> str:
    done = subprocess.run([*HARDEN, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"harden {' '.join(map(str, args[:2]))} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def bundle(folder: Path, name: str, flags: list[str], key: str) -> tuple[Path, Path]:
    path, graph = folder / f"{name}-{key}.hardened", folder / f"{name}-{key}.onnx"
    if not path.exists():
        run(["instrument", *BASE, *flags, "--key", key, "-o", path])
    if not graph.exists():
        run(["export", path, "-o", graph])
    return path, graph


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(results: dict) -> str:
    budgets = results["budgets"]
    lines = ["| method | " + " | ".join(f"{b}: undefended / key known / key unknown / proxy" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for name, rows in results["configs"].items():
        cells = []
        for b in budgets:
            r = rows[b]
            cells.append(" / ".join([_pct(r["undefended"]), _pct(r["key_known"]),
                                     _pct(r["key_unknown"]) if r["key_unknown"] is not None else "-",
                                     _pct(r.get("proxy_transfer")) if "proxy_transfer" in r else "-"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/adaptive.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--folder", type=Path, default=ROOT / "out" / "adaptive")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="print the table of a saved JSON and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    args.folder.mkdir(parents=True, exist_ok=True)
    results: dict = {"limit": args.limit, "budgets": [f"{n} {e:g}" for n, e in BUDGETS], "configs": {}}
    for name in args.configs.split(","):
        flags, keyed = CONFIGS[name]
        target, graph = bundle(args.folder, name, flags, KEY)
        proxy = bundle(args.folder, name, flags, PROXY_KEY)[0] if keyed else None
        rows = {}
        for norm, eps in BUDGETS:
            common = ["evaluate", graph, "--adaptive", "--adaptive-norm", norm, "--adaptive-eps", eps,
                      "--limit", args.limit, "--json"]
            started = time.perf_counter()
            report = json.loads(run(common))["adaptive"]
            seconds = time.perf_counter() - started
            row = {"original": report.get("original", {}).get("fooled"), "undefended": report["type_i"]["fooled"], "plain_undetected": report["type_i"]["success"],
                   "key_known": report["type_ii"]["success"],
                   "key_unknown": report["key_unknown"].get("success"),
                   "key_unknown_note": report["key_unknown"].get("skipped"),
                   "n_correct": report["n_correct"], "seconds": round(seconds, 1)}
            if proxy is not None:
                transfer = json.loads(run([*common, "--adaptive-attacker", "key-unknown", "--adaptive-proxy", proxy]))
                row["proxy_transfer"] = transfer["adaptive"]["key_unknown"]["success"]
            rows[f"{norm} {eps:g}"] = row
            print(f"{name} {norm} {eps:g}: {json.dumps(row)}", file=sys.stderr, flush=True)
        results["configs"][name] = rows
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
