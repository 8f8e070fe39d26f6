"""Type II (adaptive) attack on a SafetyNet bundle: how often it fools the classifier AND evades the detector.

    python bench/experiments/safetynet_adaptive.py BUNDLE.hardened [--limit 200] [--eps 0.1] \
        [--lam 1 --lam 10] [--temperature 0.1 --temperature 0.3] [--widen 10]

Runs ``harden.evaluation.evaluate.evaluate_adaptive`` (what ``harden evaluate --adaptive`` runs) on the first --limit test
inputs of the split the bundle recorded, for every (temperature, widen) and each lam alone, then all lams as
restarts; scored through a fresh ONNX export of the bundle. The type I row (lam 0, detector-blind) comes with
each report. One JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.evaluation.adaptive import AdaptiveSettings  # noqa: E402
from harden.api import bundle_data, scorer_for  # noqa: E402
from harden.evaluation.evaluate import evaluate_adaptive  # noqa: E402
from harden.bundle.archive import load_bundle  # noqa: E402


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
    x, y = data.test.x.numpy(), data.test.y.numpy()
    scorer = scorer_for(hardened, None).run
    lams = args.lam or [1.0, 10.0]
    for t in args.temperature or [0.1]:
        for w in args.widen or [10.0]:
            for lam_set in ([[v] for v in lams] + [lams] if len(lams) > 1 else [lams]):
                settings = AdaptiveSettings(eps=args.eps, steps=args.steps, lams=tuple(lam_set),
                                            surrogate={"temperature": t, "widen": w})
                report = evaluate_adaptive(hardened, scorer, x, y, settings, input_range=tuple(manifest["input"]["range"]),
                                           num_classes=manifest["num_classes"], limit=args.limit)
                print(json.dumps({"bundle": str(args.bundle), **report}), flush=True)


if __name__ == "__main__":
    main()
