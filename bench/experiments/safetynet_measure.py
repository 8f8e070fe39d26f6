"""Evaluate several SafetyNet bundles of one classifier on the SAME adversarial examples, as ``harden evaluate`` does.

    python bench/experiments/safetynet_measure.py /tmp/sn/*.hardened --limit 300 [--attack ...] > results.jsonl

Each bundle is scored through its exported ONNX graph (``X.onnx`` beside ``X.hardened``) by
``harden.api.evaluate`` -- the function behind ``harden evaluate --json`` -- with ``harden.evaluation.evaluate.run_attack``
memoised: the attacks are crafted on the classifier alone (seeded), so every bundle of the same classifier gets
identical adversarial examples, and DeepFool / C&W run once instead of once per bundle. One JSON line per bundle:
the SafetyNet configuration from the manifest (sites, code, support vectors), the test-split FPR of the whole
1,000-sample split, and the evaluation report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import harden.evaluation.evaluate as evaluation  # noqa: E402
from harden.api import evaluate  # noqa: E402
from harden.bundle.archive import load_bundle  # noqa: E402

ATTACKS = ["fgsm:eps=0.1", "bim:eps=0.1", "pgd:eps=0.1", "deepfool", "cw"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--attack", action="append", default=None)
    p.add_argument("--limit", type=int, default=300)
    args = p.parse_args()

    cache: dict[tuple, object] = {}
    original = evaluation.run_attack

    def memo(model, spec, x, y, **kw):
        key = (spec.label(), hashlib.sha256(x.tobytes()).hexdigest(), kw.get("seed"))
        if key not in cache:
            cache[key] = original(model, spec, x, y, **kw)
        return cache[key]

    evaluation.run_attack = memo
    for bundle in args.bundles:
        started = time.perf_counter()
        hardened, manifest = load_bundle(bundle)
        onnx_path = bundle.with_suffix(".onnx")
        report = evaluate(hardened, manifest, args.attack or ATTACKS, onnx_path=onnx_path if onnx_path.exists() else None,
                          limit=args.limit)
        method = next(m for m in manifest["methods"] if m["name"] == "safetynet")
        print(json.dumps({"bundle": str(bundle), "config": method["config"], "threshold": method["threshold"],
                          "metrics": manifest["metrics"], "fpr_target": manifest["fpr_target"],
                          "report": report.to_json(), "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
