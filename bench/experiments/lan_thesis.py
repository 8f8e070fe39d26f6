"""docs/results/lan.md, "As the thesis measures it": f2's accuracy on benign masks and Tables 1, 2 and 4 of thesis
section 3.3 (FGSM, JSMA, CW) on a suite pair, beside harden's calibrated alarm read from the exported ONNX graph.

    OMP_NUM_THREADS=1 python -m bench.experiments.lan_thesis [--pair lenet5-mnist] [--split test] [--limit 500] \
        [--set beta=0.5 ...] [--json]

The bundle is the suite's (``bench.suite``: same key, same cache); FGSM runs at the pair's eps (the FGSM eps that
halves the classifier's calibration accuracy), JSMA and CW at harden's defaults, all on the classifier (ART).
Measures, among adversarial examples that fool the classifier on an input it classified correctly:
retained = f2 gives the adversarial mask the benign mask's class (Table 1); thesis TP = f2's class differs from the
classifier's (Table 2, the thesis's rule); harden TP = the calibrated alarm of the ONNX graph.  TN is over the
benign inputs: f2 agrees with the classifier (thesis), no alarm (harden).  "Correct masks only" repeats the thesis
TP/TN on the inputs whose benign mask f2 classifies correctly (Table 4).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from bench.suite.pairs import CACHE, load_pair
from bench.suite.run import SUITE_KEY, _instrumented, _state_hash, build_options, pair_eps

ATTACKS = ("fgsm", "jsma", "cw")


def _adversarial(model, spec_text: str, x, y, lp, split: str) -> np.ndarray:
    from harden.attacks.catalog import parse_attack, run_attack

    tag = f"thesis-{lp.pair.name}-{split}-{len(x)}-{spec_text}-{_state_hash(model)}"
    path = CACHE / "adv" / (hashlib.sha256(tag.encode()).hexdigest()[:20] + ".npy")
    if path.exists():
        return np.load(path)
    x_adv = run_attack(model, parse_attack(spec_text), x, y, input_range=lp.data.input_range,
                       num_classes=lp.data.num_classes, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x_adv)
    return x_adv


def _rate(mask: np.ndarray) -> float | None:
    return round(float(mask.mean()), 4) if mask.size else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="lenet5-mnist")
    parser.add_argument("--split", default="test", choices=("test", "calibration"))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from harden.api import export_onnx
    from harden.export.runtime import OnnxGraph

    lp = load_pair(args.pair)
    names, options = build_options("lan", args.set, args.fpr, 0, SUITE_KEY)
    hardened, seconds = _instrumented(lp, names, options, SimpleNamespace(policy="any", fresh=False))
    graph = OnnxGraph(export_onnx(hardened).model.SerializeToString())
    head = hardened.method("lan").head
    part = getattr(lp.data, args.split)
    x, y = part.x[: args.limit].numpy(), part.y[: args.limit].numpy()
    eps = float(pair_eps(lp)["eps"])

    def classes(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classifier's class, f2's class, the graph's alarm)."""
        with torch.no_grad():
            t = torch.from_numpy(inputs)
            f1 = hardened.classifier(t).argmax(1).numpy()
            f2 = head.mask_probabilities(t).argmax(1).numpy()
        return f1, f2, graph.run(inputs)["lan.alarm"]

    f1, f2, alarm = classes(x)
    correct_mask = f2 == y
    out = {"pair": args.pair, "split": args.split, "n": len(x), "eps": eps, "fpr_target": args.fpr,
           "options": hardened.method("lan").config["options"], "instrument_seconds": round(seconds, 1),
           "classifier_accuracy": _rate(f1 == y), "f2_accuracy": _rate(correct_mask), "agreement": _rate(f1 == f2),
           "thesis_tn": _rate(f1 == f2), "harden_tn": _rate(~alarm), "correct_masks": int(correct_mask.sum()),
           "thesis_tn_correct_masks": _rate((f1 == f2)[correct_mask]), "attacks": {}}
    for name in ATTACKS:
        spec = f"fgsm:eps={eps:g}" if name == "fgsm" else name
        started = time.perf_counter()
        x_adv = _adversarial(hardened.classifier, spec, x, y, lp, args.split)
        a1, a2, a_alarm = classes(x_adv)
        ok = (f1 == y) & (a1 != y)
        out["attacks"][spec] = {
            "successful": int(ok.sum()), "retained": _rate((a2 == f2)[ok]), "thesis_tp": _rate((a2 != a1)[ok]),
            "harden_tp": _rate(a_alarm[ok]), "thesis_tp_correct_masks": _rate((a2 != a1)[ok & correct_mask]),
            "successful_correct_masks": int((ok & correct_mask).sum()), "seconds": round(time.perf_counter() - started, 1)}
        print(f"{spec}: {out['attacks'][spec]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.pair} ({args.split} split, {len(x)} inputs): classifier accuracy {out['classifier_accuracy']}, "
          f"f2 accuracy on benign masks {out['f2_accuracy']}, agreement {out['agreement']}; "
          f"TN thesis rule {out['thesis_tn']}, harden alarm at FPR {args.fpr} {out['harden_tn']}")
    print("| attack | successful | mask class retained (T1) | TP thesis rule (T2) | TP harden alarm | "
          "TP thesis rule, correct masks (T4) |")
    print("|---|---|---|---|---|---|")
    for spec, r in out["attacks"].items():
        print(f"| {spec} | {r['successful']} | {r['retained']} | {r['thesis_tp']} | {r['harden_tp']} | "
              f"{r['thesis_tp_correct_masks']} (of {r['successful_correct_masks']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
