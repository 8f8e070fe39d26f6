"""Type II (adaptive) attack on a SafetyNet bundle: how often it fools the classifier AND evades the detector.

    python bench/experiments/safetynet_adaptive.py BUNDLE.hardened [--limit 200] [--eps 0.1]

Runs ``harden.methods.safetynet.adaptive_attack`` on the first --limit test inputs (the split the bundle
recorded): lam=0 is the type I baseline (the same margin PGD, detector ignored); lam>0 adds the smoothed
detector score (sigmoid codes of width --temperature x each unit's mean positive activation, RBF gamma divided
by --widen). Success is judged on the exact hardened model (hard codes, real SVM, calibrated threshold) and
re-checked through the exported ONNX graph. One JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.api import bundle_data  # noqa: E402
from harden.export import export_onnx  # noqa: E402
from harden.io.bundle import load_bundle  # noqa: E402
from harden.methods.safetynet import adaptive_attack  # noqa: E402
from harden.runtime import OnnxGraph  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lam", type=float, action="append", default=None)
    p.add_argument("--temperature", type=float, action="append", default=None)
    p.add_argument("--widen", type=float, action="append", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    hardened, manifest = load_bundle(args.bundle)
    data = bundle_data(manifest)
    x, y = data.test.x[: args.limit].numpy(), data.test.y[: args.limit].numpy()
    graph = OnnxGraph(export_onnx(hardened).model.SerializeToString())
    settings = [(0.0, 0.1, 10.0)]
    for lam in args.lam or [1.0, 10.0]:
        for t in args.temperature or [0.1, 0.3]:
            for w in args.widen or [10.0]:
                settings.append((lam, t, w))
    for lam, t, w in settings:
        started = time.perf_counter()
        r = adaptive_attack(hardened, x, y, args.eps, steps=args.steps, lam=lam, temperature=t, widen=w)
        onnx = graph.run(r.pop("x_adv"))
        clean = graph.run(x)
        correct = clean["logits"].argmax(1) == y
        fooled = onnx["logits"].argmax(1) != y
        evaded = ~onnx["safetynet.alarm"]
        r["onnx_success"] = float((fooled & evaded & correct).sum() / max(1, correct.sum()))
        r["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({"bundle": str(args.bundle), **r}), flush=True)


if __name__ == "__main__":
    main()
