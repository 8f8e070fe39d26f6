"""Peak memory of certify and evaluate against data size, for data read on demand (memory-mapped .npy) and for
the same data held in memory.  Prints JSON.

    python -m bench.memory --bundle out/edge/ctt-strict-readme-demo-key.hardened --sizes 4000 16000 64000

Each size is a synthetic x.npy (uint8, the bundle's input shape) with random labels; every command runs in its
own process over the WHOLE test split (20% of the data) and reports its peak resident set size.  On demand:
``HARDEN_IN_MEMORY_LIMIT`` set to 1 MB, so any size is read in batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEAK = r"""
import resource, runpy, sys
sys.argv = ["harden"] + sys.argv[1:]
try:
    runpy.run_module("harden.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run(args: list[str], lazy: bool) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if lazy:
        env["HARDEN_IN_MEMORY_LIMIT"] = str(1 << 20)
    else:
        env.pop("HARDEN_IN_MEMORY_LIMIT", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {done.stderr.strip().splitlines()[-2:]}")
    kb = next(int(l.split()[1]) for l in done.stderr.splitlines() if l.startswith("PEAK_KB"))
    return kb / 1024, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 64000])
    args = parser.parse_args(argv)
    manifest = json.loads(__import__("zipfile").ZipFile(args.bundle).read("manifest.json"))
    shape = tuple(manifest["input"]["shape"])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            data = Path(folder) / f"n{n}"
            data.mkdir()
            rng = np.random.default_rng(n)
            x = np.lib.format.open_memmap(data / "x.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
            for start in range(0, n, 4096):
                x[start:start + 4096] = rng.integers(0, 256, (min(4096, n - start), *shape), dtype=np.uint8)
            x.flush()
            del x
            np.save(data / "y.npy", rng.integers(0, manifest["num_classes"], n).astype(np.int64))
            data_mb = n * int(np.prod(shape)) * 4 / 1024**2
            test = n - round(0.6 * n) - round(0.2 * n)
            for lazy in (False, True):
                certify_mb, certify_s = run(["certify", str(args.bundle), "--data", str(data), "--eps", "0.01",
                                             "--json"], lazy)
                evaluate_mb, evaluate_s = run(["evaluate", str(args.bundle), "--data", str(data), "--limit", str(test),
                                               "--attack", "fgsm:eps=0.1", "--json"], lazy)
                rows.append({"samples": n, "test_samples": test, "float32_mb": round(data_mb, 1),
                             "read": "on demand" if lazy else "in memory",
                             "certify_peak_mb": round(certify_mb), "certify_s": round(certify_s, 1),
                             "evaluate_peak_mb": round(evaluate_mb), "evaluate_s": round(evaluate_s, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bundle": str(args.bundle), "shape": list(shape), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
