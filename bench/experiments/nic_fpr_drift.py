"""Calibration FPR against test FPR of NIC over data-split seeds and keys (is the drift split noise?).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.experiments.nic_fpr_drift --seeds 0 1 2 3 4 --keys a b --fpr 0.05

For each (split seed, key) NIC is instrumented exactly as ``harden instrument --method nic`` does and both splits
are scored by the torch + scikit-learn path.  The example LeNet-5 was trained on the train + calibration splits of
seed 0 (harden/examples/train_lenet.py), so under seed 0 the calibration digits were seen by the classifier and the test
digits were not; under any other seed the three splits mix seen and unseen digits alike.  Printed per run, besides
both FPRs: the test FPR split by whether the classifier got the digit right, and the test FPR on the digits the
classifier was / was not trained on (its training set: seed-0 train + calibration).
One JSON line per run, then a summary line (mean and sd per seed group).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench.experiments.example import load_lenet, parse_sets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--keys", nargs="+", default=["nic-drift-a", "nic-drift-b"])
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--seen", default="train,calibration",
                        help="the seed-0 splits the classifier was trained on (harden/examples/train_lenet.py: train,calibration)")
    parser.add_argument("--set", action="append", default=[], help="extra option, name=json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options

    extra = parse_sets(args.set)
    model = load_lenet(args.checkpoint)
    seen_data = load_data("mnist", seed=0)
    seen = {x.numpy().tobytes() for name in args.seen.split(",")
            for x in getattr(seen_data, name.strip()).x}
    rows = []
    for seed in args.seeds:
        data = load_data("mnist", seed=seed)
        test_seen = np.array([x.numpy().tobytes() in seen for x in data.test.x])
        for key in args.keys:
            hardened = instrument(model, data, ["nic"], Options(key=key, fpr=args.fpr, extra=extra))
            cal = hardened.run(data.calibration.x)
            test = hardened.run(data.test.x)
            correct = test["logits"].argmax(1) == data.test.y.numpy()
            row = {"seed": seed, "key": key, "extra": extra,
                   "calibration_fpr": float(cal["alarm"].mean()), "test_fpr": float(test["alarm"].mean()),
                   "test_fpr_correct": float(test["alarm"][correct].mean()),
                   "test_fpr_wrong": float(test["alarm"][~correct].mean()) if (~correct).any() else None,
                   "test_wrong": int((~correct).sum()),
                   "test_fpr_seen": float(test["alarm"][test_seen].mean()) if test_seen.any() else None,
                   "test_fpr_unseen": float(test["alarm"][~test_seen].mean()) if (~test_seen).any() else None,
                   "test_seen": int(test_seen.sum())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for label, group in (("seed 0", [r for r in rows if r["seed"] == 0]), ("seeds != 0", [r for r in rows if r["seed"] != 0])):
        if not group:
            continue
        gap = np.array([r["test_fpr"] - r["calibration_fpr"] for r in group])
        test = np.array([r["test_fpr"] for r in group])
        print(json.dumps({"group": label, "runs": len(group), "test_fpr_mean": round(float(test.mean()), 4),
                          "test_fpr_sd": round(float(test.std(ddof=1)), 4) if len(group) > 1 else None,
                          "gap_mean": round(float(gap.mean()), 4),
                          "gap_sd": round(float(gap.std(ddof=1)), 4) if len(group) > 1 else None}), flush=True)


if __name__ == "__main__":
    main()
