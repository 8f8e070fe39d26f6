"""docs/results/nic.md "provenance_gamma 3, provenance_nu 0.05": NIC fitted per setting, its invariant scores fused by each rule."""

# NIC is instrumented once per setting (training split only, key ``--key``); the per-invariant scores
# (``NICDetector.set_scores``) are computed for the held-out training rows (the rows the final SVM is fitted on),
# the clean calibration and test splits and the adversarial examples of ``--adv``
# (``bench/experiments/nic_attacks.py``).  Each fusion rule maps the [N, n_invariants] matrix to one score; its
# threshold is set on the clean calibration split at ``--fpr`` (the empirical quantile, as ``--fpr-confidence 0``), and per attack the detection of
# successful adversarial examples is printed, with the test FPR.  Rules:
#
# * ``svm``: the fitted final one-class SVM (what NIC does);
# * ``tail-max`` / ``tail-sum``: each invariant score turned into a benign tail score on the held-out rows
#   (-log of the empirical tail probability, linearly interpolated between the held-out order statistics), then
#   the max / the sum over invariants;
# * ``z-max``: each score standardised by held-out quantiles ((s - median) / (q99 - median)), then the max;
# * ``svm+tail-max``: the max of the SVM's and the invariants' tail scores.

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench.experiments.example import load_lenet, parse_sets


def tail_transform(reference: np.ndarray):
    """s -> -log P_benign(S >= s), interpolated linearly between the held-out order statistics; beyond the largest
    the slope of the last segment continues (so a far-out score keeps growing)."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    n = len(ref)
    # at ref[i] (ascending), the tail probability is (n - i) / (n + 1)
    knots_y = -np.log((n - np.arange(n)) / (n + 1.0))

    def f(s):
        s = np.asarray(s, dtype=np.float64)
        y = np.interp(s, ref, knots_y)
        span = max(ref[-1] - ref[-5], 1e-9)
        slope = (knots_y[-1] - knots_y[-5]) / span
        return np.where(s > ref[-1], knots_y[-1] + slope * (s - ref[-1]), y)

    return f


def threshold(clean: np.ndarray, fpr: float) -> float:
    from harden.detectors.calibration import threshold_for_count

    return threshold_for_count(clean, int(np.floor(fpr * len(clean))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    parser.add_argument("--adv", required=True)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--key", default="nic-select")
    parser.add_argument("--set", action="append", default=[], help="NIC option (harden methods nic), name=json; repeatable")
    parser.add_argument("--rule", action="append", default=None, help="only these rules (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import MethodSpec, Options, key_seed

    extra = parse_sets(args.set)
    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    hardened = instrument(model, data, [MethodSpec.of("nic", **extra)], Options(key=args.key, fpr=args.fpr))
    method = hardened.method("nic")
    detector = method.detector

    def invariants(x) -> tuple[np.ndarray, np.ndarray]:
        feats = hardened.torch_outputs(torch.as_tensor(np.asarray(x, dtype=np.float32)))[method.feature_output]
        return detector.set_scores(feats)[1][0].astype(np.float64), detector.score(feats).astype(np.float64)

    order = np.random.default_rng(key_seed(args.key, "nic:split")).permutation(len(data.train))
    rows_b = order[: int(round(1 / 3 * len(order)))]
    held, _ = invariants(data.train.x[rows_b])
    cal, cal_svm = invariants(data.calibration.x)
    test, test_svm = invariants(data.test.x)
    with np.load(args.adv) as npz:
        adv = {k: npz[k] for k in npz.files}
    y, correct = adv["y"], adv["clean_pred"] == adv["y"]
    pools = {}
    for name in [k[4:] for k in adv if k.startswith("adv/")]:
        success = correct & (adv[f"pred/{name}"] != y)
        pools[name] = invariants(adv[f"adv/{name}"][success])

    tails = [tail_transform(held[:, j]) for j in range(held.shape[1])]
    med, q99, q01 = np.median(held, 0), np.quantile(held, 0.99, 0), np.quantile(held, 0.01, 0)
    lower_tails = [tail_transform(-held[:, j]) for j in range(held.shape[1])]

    def tail2(m):
        return np.stack([np.maximum(t(m[:, j]), u(-m[:, j])) for j, (t, u) in enumerate(zip(tails, lower_tails))], 1)

    def z2(m):
        return np.maximum((m - med) / np.maximum(q99 - med, 1e-9), (med - m) / np.maximum(med - q01, 1e-9))

    def tail(m):
        return np.stack([t(m[:, j]) for j, t in enumerate(tails)], 1)

    held_svm = detector.score(hardened.torch_outputs(data.train.x[rows_b])[method.feature_output]).astype(np.float64)
    svm_tail = tail_transform(held_svm)
    rules = {
        "svm": lambda m, s: s,
        "tail-max": lambda m, s: tail(m).max(1),
        "tail-sum": lambda m, s: tail(m).sum(1),
        "tail-top2": lambda m, s: np.sort(tail(m), 1)[:, -2:].sum(1),
        "z-max": lambda m, s: ((m - med) / (q99 - med)).max(1),
        "svm+tail-max": lambda m, s: np.maximum(svm_tail(s), tail(m).max(1)),
        "tail2-max": lambda m, s: tail2(m).max(1),
        "tail2-sum": lambda m, s: tail2(m).sum(1),
        "z2-max": lambda m, s: z2(m).max(1),
        "svm+tail2-max": lambda m, s: np.maximum(svm_tail(s), tail2(m).max(1)),
    }
    from harden.detectors.dense_rbf import RbfParts

    spec = detector.sets[0]
    support = [int(RbfParts.of(p.estimator).svm.support_vectors_.shape[0]) for p in spec.parts]
    support.append(int(RbfParts.of(spec.final).svm.support_vectors_.shape[0]))
    for rule, f in rules.items():
        if args.rule and rule not in args.rule:
            continue
        t = threshold(f(cal, cal_svm), args.fpr)
        row = {"extra": extra, "rule": rule, "support_vectors": support, "calibration_fpr": float((f(cal, cal_svm) > t).mean()),
               "test_fpr": float((f(test, test_svm) > t).mean()), "detect": {}}
        for name, (m, s) in pools.items():
            row["detect"][name] = round(float((f(m, s) > t).mean()), 3)
        d = list(row["detect"].values())
        row["min"], row["mean"] = round(min(d), 3), round(float(np.mean(d)), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
