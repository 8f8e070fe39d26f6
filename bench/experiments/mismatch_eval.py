"""A mismatch bundle on the test split: gradient attacks and quality degradations, scored through ONNX.

    .venv/bin/python -m bench.experiments.mismatch_eval /tmp/mm/mm.hardened --limit 300 \
        [--attack fgsm:eps=0.1 ...] [--pool /tmp/mm/pool] [--json]

Gradient attacks go through ``harden.evaluation.evaluate.evaluate`` (the same code as ``harden evaluate``): crafted on the
classifier, scored by onnxruntime on a fresh parity-checked export of the bundle.  Quality degradations (Gaussian
noise, Gaussian blur, salt and pepper; line search for the smallest level that flips the classifier, see
:mod:`bench.experiments.mismatch_common`) are scored the same way; with ``--pool`` the cached test-split
degradations of :mod:`bench.experiments.mismatch_pool` are reused.

Detection rates are given among the *successful* adversarial inputs (originally correct, now misclassified: the
paper's measure) and among all originally-correct inputs (``harden evaluate``'s ``detection_rate``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.experiments.mismatch_common import DEGRADATIONS, GRADIENT_ATTACKS, degrade


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--attack", action="append", default=None)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--pool", type=Path, default=None)
    parser.add_argument("--no-degradations", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.api import bundle_data
    from harden.attacks.catalog import parse_attack
    from harden.evaluation.evaluate import evaluate, roc_auc
    from harden.export import export_onnx
    from harden.bundle.archive import load_bundle
    from harden.export.runtime import OnnxGraph

    hardened, manifest = load_bundle(args.bundle)
    data = bundle_data(manifest)
    x, y = data.test.x[: args.limit].numpy(), data.test.y[: args.limit].numpy()
    started = time.perf_counter()
    exported = export_onnx(hardened)
    graph = OnnxGraph(exported.model.SerializeToString())
    specs = [parse_attack(a) for a in args.attack or GRADIENT_ATTACKS]
    report = evaluate(hardened.classifier, graph.run, x, y, specs, input_range=data.input_range,
                      num_classes=data.num_classes, seed=0)
    out = {"bundle": str(args.bundle), "limit": args.limit, "parity": exported.parity.to_json(),
           "fpr_target": manifest["fpr_target"], **report.to_json(), "degradations": []}

    if not args.no_degradations:
        clean = graph.run(x)
        correct = clean["logits"].argmax(1) == y
        for i, kind in enumerate(DEGRADATIONS):
            t0 = time.perf_counter()
            cached = args.pool / f"test_{kind}.npz" if args.pool else None
            if cached is not None and cached.exists() and len(np.load(cached)["x"]) == len(x):
                adv = np.load(cached)["adv"]
            else:
                adv = degrade(hardened.classifier, kind, x, y, seed=17 * (len(GRADIENT_ATTACKS) + i),
                              input_range=data.input_range)[0]
            got = graph.run(adv)
            successful = correct & (got["logits"].argmax(1) != y)
            delta = (adv - x).reshape(len(x), -1)
            out["degradations"].append({
                "attack": kind, "n": len(x), "n_correct": int(correct.sum()), "n_successful": int(successful.sum()),
                "accuracy": float((got["logits"].argmax(1) == y).mean()),
                "detection_rate": float(got["alarm"][correct].mean()),
                "detection_rate_successful": float(got["alarm"][successful].mean()) if successful.any() else None,
                "mean_l2": float(np.linalg.norm(delta[correct], axis=1).mean()),
                "roc_auc": roc_auc(clean["mismatch.score"], got["mismatch.score"][successful]),
                "seconds": round(time.perf_counter() - t0, 1),
            })
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"clean accuracy {out['clean_accuracy']:.3f}  clean FPR {out['clean_fpr']:.3f} (target {out['fpr_target']})")
    for row in out["rows"] + out["degradations"]:
        det_s = row["detection_rate_successful"]
        auc = row["roc_auc"].get("mismatch.score") if isinstance(row["roc_auc"], dict) else row["roc_auc"]
        print(f"{row['attack']:>14}: acc {row['accuracy']:.3f}  successful {row['n_successful']:>3}/{row['n_correct']}  "
              f"det(successful) {'-' if det_s is None else f'{det_s:.3f}'}  det(correct) {row['detection_rate']:.3f}  "
              f"l2 {row['mean_l2']:.3f}  AUC {'-' if auc is None else f'{auc:.3f}'}")


if __name__ == "__main__":
    main()
