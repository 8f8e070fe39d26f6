"""docs/results/nic.md "Shortfalls": NIC fitted on digits the classifier did not train on (regimes A-D), per key."""

# The example checkpoint trains on the 3,000 training digits of the seed-0 split only; harden instrument fits NIC on
# those same digits and calibrates on the 1,000 calibration digits.  Regimes (the test split and its adversarial
# examples, from nic_attacks --split test, are the same for all; torch + scikit-learn path, NIC defaults):
#
# * A: fit on train (3000), calibrate on calibration (1000)  -- what harden instrument does;
# * B: fit on calibration[:600] (unseen by the classifier), calibrate on calibration[600:] (400);
# * C: fit on train + calibration[:600], calibrate on calibration[600:];
# * D (control for B's size): fit on train[:600] (seen), calibrate on calibration[600:].
#
# Per regime and key: calibration FPR, test FPR on the 1,000 test digits, detection of the successful adversarial
# examples of the first test digits, the ROC-AUC of nic.score (successful adversarial examples against the clean
# test digits) and the detection at a threshold put at exactly --fpr on the clean test digits (an oracle).


from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from bench.experiments.example import load_lenet

HELD_OUT_FIT = 600  # calibration digits used for fitting in B / C; the remaining 400 calibrate


def _auc(benign: np.ndarray, adversarial: np.ndarray) -> float:
    """P(adversarial score > benign score), ties half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([benign, adversarial]))
    n_b, n_a = len(benign), len(adversarial)
    return float((ranks[n_b:].sum() - n_a * (n_a + 1) / 2) / (n_a * n_b))


def _regimes(data):
    from harden.io.data import Split

    def cat(*splits):
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))

    def part(split, sl):
        return Split(split.x[sl], split.y[sl])

    cal_fit = part(data.calibration, slice(None, HELD_OUT_FIT))
    cal_rest = part(data.calibration, slice(HELD_OUT_FIT, None))
    return {
        "A: fit train 3000, calibrate calibration 1000": (data.train, data.calibration),
        "B: fit calibration[:600] (unseen), calibrate calibration[600:]": (cal_fit, cal_rest),
        "C: fit train + calibration[:600], calibrate calibration[600:]": (cat(data.train, cal_fit), cal_rest),
        "D: fit train[:600] (seen), calibrate calibration[600:]": (part(data.train, slice(None, HELD_OUT_FIT)), cal_rest),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adv", required=True, help="npz of bench.experiments.nic_attacks on the test split")
    parser.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    parser.add_argument("--key", action="append", default=None)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--fpr-confidence", type=float, default=0.9, help="as harden instrument's (0: empirical quantile)")
    parser.add_argument("--regime", action="append", default=None, help="letters to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options

    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    pool = np.load(args.adv)
    y, clean_pred = pool["y"], pool["clean_pred"]
    n = len(y)
    if not np.array_equal(pool["x"], data.test.x[:n].numpy()):
        raise SystemExit(f"{args.adv} is not the first {n} digits of the test split")
    correct = clean_pred == y

    for key in args.key or ["nic-results"]:
        for name, (fit_split, cal_split) in _regimes(data).items():
            if args.regime and name[0] not in args.regime:
                continue
            dataset = dataclasses.replace(data, train=fit_split, calibration=cal_split)
            started = time.perf_counter()
            hardened = instrument(model, dataset, ["nic"], Options(key=key, fpr=args.fpr, fpr_confidence=args.fpr_confidence))
            seconds = round(time.perf_counter() - started, 1)
            metrics = hardened.facts["metrics"]
            clean = hardened.run(data.test.x)
            oracle = float(np.quantile(clean["nic.score"], 1.0 - args.fpr))
            row = {"key": key, "regime": name, "fit": len(fit_split), "calibrate": len(cal_split),
                   "calibration_fpr": round(metrics["calibration_fpr"], 4),
                   "test_fpr": round(float(clean["nic.alarm"].mean()), 4), "seconds": seconds}
            for label in [k[len("adv/"):] for k in pool.files if k.startswith("adv/")]:
                out = hardened.run(pool[f"adv/{label}"])
                success = correct & (pool[f"pred/{label}"] != y)
                row[label] = {"det_succ": round(float(out["nic.alarm"][success].mean()), 4),
                              "det_correct": round(float(out["nic.alarm"][correct].mean()), 4),
                              "n_succ": int(success.sum()),
                              "auc": round(_auc(clean["nic.score"], out["nic.score"][success]), 3),
                              # threshold-free view: detection if the threshold sat at exactly --fpr on the clean
                              # test digits (an oracle, not deployable): separability apart from calibration noise
                              "det_succ_at_test_fpr": round(float((out["nic.score"][success] > oracle).mean()), 4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
