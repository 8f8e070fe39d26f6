"""docs/results/mismatch.md "attacks": the mismatch SVC trained on each attack or mix, tested on every attack (and Figure 5)."""

#     python -m bench.experiments.mismatch_select --bundle /tmp/mm/mm.hardened --pool /tmp/mm/pool \
#         --eval-split calibration [--fpr 0.05] [--json]
#
# Uses the cached pools of :mod:`bench.experiments.mismatch_pool`.  For each training candidate (one attack, or a mix
# where each training image gets ONE attack of the mix at random, as the method does) the SVM is fitted exactly as
# ``harden.methods.mismatch.fit_svm`` fits it (StandardScaler + RBF SVC, grouped 3-fold grid), on natural training
# images (0) and the successful adversarial versions (1), each made against the classifier or the second model at
# random.  The threshold is set on the clean CALIBRATION split (all of it) at ``--fpr``, as calibration does.  Then,
# per test attack (made against the classifier on ``--eval-split``): detection rate among successful adversarial
# examples (originally correct, now misclassified), among all originally-correct ones (``harden evaluate``'s
# definition), and ROC-AUC against the clean inputs of that split.
#
# Selection of the default (``--eval-split calibration``, never the test split): the candidate with the highest
# WORST-CASE detection (successful) over the five gradient attacks; the mean breaks ties.
# Run with ``--eval-split test`` for the reported cross-attack matrix (paper Figure 5).

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.experiments.mismatch_common import DEGRADATIONS, GRADIENT_ATTACKS, predict
from bench.experiments.mismatch_pool import slug

SHORT = {"fgsm:eps=0.1": "FGSM", "bim:eps=0.1": "BIM", "pgd:eps=0.1": "PGD", "deepfool": "DeepFool", "cw": "CW",
         "noise": "Noise", "blur": "Blur", "saltpepper": "S&P"}
MIXES = {
    "FGSM+PGD+DeepFool": ["fgsm:eps=0.1", "pgd:eps=0.1", "deepfool"],
    "FGSM+PGD": ["fgsm:eps=0.1", "pgd:eps=0.1"],
    "PGD+DeepFool": ["pgd:eps=0.1", "deepfool"],
    "all gradient": GRADIENT_ATTACKS,
    "FGSM+PGD+S&P": ["fgsm:eps=0.1", "pgd:eps=0.1", "saltpepper"],
    "all 8": GRADIENT_ATTACKS + DEGRADATIONS,
}


def auc(neg: np.ndarray, pos: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(neg) == 0 or len(pos) == 0:
        return None
    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--pool", required=True, type=Path)
    parser.add_argument("--eval-split", default="calibration", choices=["calibration", "test"])
    parser.add_argument("--fpr", type=float, action="append", default=None)
    parser.add_argument("--max-train", type=int, default=3000)
    parser.add_argument("--only", action="append", default=None, help="candidate names to run (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fprs = args.fpr or [0.02, 0.05]

    from harden.api import bundle_data
    from harden.detectors.calibration import threshold_for_count
    from harden.bundle.archive import load_bundle
    from harden.methods.mismatch import _features, fit_svm

    hardened, manifest = load_bundle(args.bundle)
    classifier = hardened.classifier.eval()
    head = hardened.method("mismatch").head.eval()
    data = bundle_data(manifest)
    attacks = GRADIENT_ATTACKS + DEGRADATIONS

    def feats(x: np.ndarray) -> np.ndarray:
        return _features(head, classifier, torch.from_numpy(np.ascontiguousarray(x)))

    train = {a: dict(np.load(args.pool / f"train_{slug(a)}.npz")) for a in attacks}
    evals = {a: dict(np.load(args.pool / f"{args.eval_split}_{slug(a)}.npz")) for a in attacks}
    x_train = next(iter(train.values()))["x"]
    f_train_clean = feats(x_train)
    f_train_adv = {a: feats(train[a]["adv"]) for a in attacks}
    f_cal_clean = feats(data.calibration.x.numpy())
    x_eval, y_eval = next(iter(evals.values()))["x"], next(iter(evals.values()))["y"]
    f_eval_clean = feats(x_eval)
    correct = predict(classifier, x_eval) == y_eval
    f_eval_adv = {a: feats(evals[a]["adv"]) for a in attacks}

    candidates = {SHORT[a]: [a] for a in attacks}
    candidates.update(MIXES)
    if args.only:
        candidates = {k: v for k, v in candidates.items() if k in args.only}
    n_img = len(x_train)
    results = {}
    for name, mix in candidates.items():
        started = time.perf_counter()
        rng = np.random.default_rng(7)
        choice = rng.integers(len(mix), size=n_img)
        n_keep = min(n_img, args.max_train // 2)
        keep_img = np.zeros(n_img, dtype=bool)
        keep_img[rng.choice(n_img, n_keep, replace=False)] = True
        adv_rows, adv_feats = [], []
        for j, a in enumerate(mix):
            sel = np.flatnonzero(keep_img & (choice == j) & train[a]["success"])
            adv_rows.append(sel)
            adv_feats.append(f_train_adv[a][sel])
        adv_rows = np.concatenate(adv_rows)
        nat_rows = np.flatnonzero(keep_img)
        features = np.concatenate([f_train_clean[nat_rows], *adv_feats])
        labels = np.r_[np.zeros(len(nat_rows), dtype=np.int64), np.ones(len(adv_rows), dtype=np.int64)]
        groups = np.r_[nat_rows, adv_rows]
        pipeline, facts = fit_svm(features, labels, groups, c=None, gamma=None, seed=0)
        score = lambda f: pipeline.decision_function(f).astype(np.float32)  # noqa: E731
        cal = score(f_cal_clean)
        clean_eval = score(f_eval_clean)
        row = {"train": mix, "natural": int(len(nat_rows)), "adversarial": int(len(adv_rows)), "svm": facts, "tests": {}}
        for fpr in fprs:
            t = threshold_for_count(cal, int(np.floor(fpr * len(cal))))
            row.setdefault("clean_fpr_eval", {})[str(fpr)] = round(float((clean_eval > t).mean()), 4)
            for a in attacks:
                s = score(f_eval_adv[a])
                ok = evals[a]["success"]
                entry = row["tests"].setdefault(SHORT[a], {"n_successful": int(ok.sum()), "n_correct": int(correct.sum()),
                                                           "auc": auc(clean_eval, s[correct])})
                entry[f"det_successful@{fpr}"] = round(float((s[ok] > t).mean()), 4) if ok.any() else None
                entry[f"det_correct@{fpr}"] = round(float((s[correct] > t).mean()), 4)
        grad = [row["tests"][SHORT[a]][f"det_successful@{fprs[-1]}"] for a in GRADIENT_ATTACKS]
        row["worst_gradient"] = min(grad)
        row["mean_gradient"] = round(float(np.mean(grad)), 4)
        row["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = row
        if not args.json:
            cells = " ".join(f"{SHORT[a]}={row['tests'][SHORT[a]][f'det_successful@{fprs[-1]}']:.2f}" for a in attacks)
            print(f"{name:>18}: worst {row['worst_gradient']:.3f} mean {row['mean_gradient']:.3f} | {cells} "
                  f"| C={facts['C']:g} g={facts['gamma']:.3g} SV={facts['support_vectors']}", flush=True)
    best = max(results, key=lambda k: (results[k]["worst_gradient"], results[k]["mean_gradient"]))
    out = {"eval_split": args.eval_split, "fprs": fprs, "max_train": args.max_train, "best": best, "results": results}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print("best:", best)
    (args.pool / f"select_{args.eval_split}_{args.max_train}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
