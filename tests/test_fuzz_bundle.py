"""Fuzzing the bundle loader: a few hundred derandomized mutants of a valid bundle (zip bytes, members, manifest,
classifier graph, arrays) through ``harden inspect`` and ``harden export``, in a child process so that a crash
signal fails the test instead of killing the run.  Every mutant is accepted (exit 0) or refused in one line
(exit 2); none runs code from the file, exhausts memory or leaves a file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = 300


def test_mutated_bundles_are_refused_in_one_line_and_never_crash(tiny_hardened, tmp_path):
    from harden.bundle.archive import save_bundle

    bundle = tmp_path / "valid.hardened"
    save_bundle(tiny_hardened, bundle)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "HARDEN_DEBUG": ""}
    env.pop("HARDEN_SEAL_KEY", None)
    child = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_bundle_child.py"), str(bundle), str(work),
                            str(EXAMPLES)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    current = (work / "current.json").read_text() if (work / "current.json").exists() else "none"
    assert child.returncode == 0, f"exit {child.returncode} at case {current}: {child.stderr[-3000:]}"
    counts = json.loads(child.stdout.strip().splitlines()[-1])
    assert counts["cases"] >= EXAMPLES * 0.9
    assert counts["refused"] >= counts["cases"] // 2   # most mutants are refused: the fuzzer reaches the checks
    assert counts["peak_growth_kib"] < 1024 * 1024, counts   # no mutant made the loader allocate a GiB
    assert not (work / "CANARY").exists()
