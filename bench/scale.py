"""Scale-out on one machine: certify and evaluate throughput, and CTT fine-tuning epoch time, with 1 process
against 2 torch.distributed ranks (``--workers 2``), measured side by side (runs alternate) in one run.

    python -m bench.scale --bundle out/edge/ctt-strict.hardened --model out/lenet5_mnist.pt \
        --arch harden.examples.lenet:LeNet5 --data mnist --json

Three setups, run in turn: one process with a thread per core, one process with one thread, and two ranks with
one thread each (what torchrun sets).  Times are whole commands (start-up included) and, for fine-tuning, the epochs of the history
the bundle records.  Merged reports are checked equal to the single process's (certify and evaluate exactly;
fine-tuning within 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# (label, processes, threads per process): one process on every core, one process on one thread, and the ranks
# of --workers on one thread each (what torchrun sets).
SETUPS = (("1x%d" % (os.cpu_count() or 1), 1, os.cpu_count() or 1), ("1x1", 1, 1), ("2x1", 2, 1))


def _harden(args: list[str], workers: int, threads: int) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "harden.cli", *args, "--json"] + (["--workers", str(workers)] if workers > 1 else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds, json.loads(done.stdout)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("seconds", "bundle_id", "created", "s")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _close(a, b, tol=1e-5) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v, tol) for u, v in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


def measure(name: str, args: list[str], repeat: int, items: int, key=None) -> dict:
    times: dict[str, list[float]] = {label: [] for label, _, _ in SETUPS}
    reports: dict[str, dict] = {}
    for _ in range(repeat):
        for label, workers, threads in SETUPS:   # in turn: every setup sees the same machine load
            seconds, report = _harden(args, workers, threads)
            times[label].append(seconds)
            reports[label] = report
    row = {"task": name, "items": items, "runs": repeat}
    for label in times:
        median = statistics.median(times[label])
        row[f"seconds_{label}"] = round(median, 2)
        row[f"per_second_{label}"] = round(items / median, 3)
    row["speedup_2x1_vs_1x1"] = round(row["seconds_1x1"] / row["seconds_2x1"], 3)
    row[f"speedup_2x1_vs_{SETUPS[0][0]}"] = round(row[f"seconds_{SETUPS[0][0]}"] / row["seconds_2x1"], 3)
    one, two = _strip(reports["1x1"]), _strip(reports["2x1"])
    row["identical"] = one == two if key is None else key(one, two)
    return row, reports


def finetune_epochs(report: dict) -> list[float]:
    history = report["manifest"]["methods"][0]["config"]["_history"]
    return [r["seconds"] for r in history]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a ctt-strict bundle (certify, evaluate)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--certify-limit", type=int, default=500)
    parser.add_argument("--evaluate-limit", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    certify, _ = measure("certify (crown, eps 0.01, --check 10)",
                         ["certify", str(args.bundle), "--eps", "0.01", "--bounds", "crown", "--check", "10",
                          "--limit", str(args.certify_limit)], args.repeat, args.certify_limit)
    rows.append(certify)
    evaluate, _ = measure("evaluate (FGSM and PGD-10, L-inf 0.1)",
                          ["evaluate", str(args.bundle), "--limit", str(args.evaluate_limit), "--attack", "fgsm:eps=0.1",
                           "--attack", "pgd:eps=0.1,steps=10"], args.repeat, args.evaluate_limit)
    rows.append(evaluate)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "scale.hardened"
        finetune, reports = measure(
            f"instrument ctt-strict --epochs {args.epochs}",
            ["instrument", str(args.model), "--arch", args.arch, "--data", args.data, "--method", f"ctt-strict:epochs={args.epochs}",
             "--key", "scale", "-o", str(out)], 1, args.epochs,
            key=lambda a, b: _close({k: v for k, v in a["manifest"].items() if k != "metrics"},
                                    {k: v for k, v in b["manifest"].items() if k != "metrics"}))
    epochs = {label: finetune_epochs(reports[label]) for label, _, _ in SETUPS}
    finetune.update({f"epoch_seconds_{label}": value for label, value in epochs.items()})
    finetune["epoch_speedup_2x1_vs_1x1"] = round(statistics.mean(epochs["1x1"]) / statistics.mean(epochs["2x1"]), 3)
    rows.append(finetune)
    result = {"cores": os.cpu_count(), "rows": rows}
    print(json.dumps(result, indent=1) if args.json else "\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
    main()
