"""The NIC results table (paper Table I / III shape) on LeNet-5 / MNIST, scored through the exported ONNX graph.

    .venv/bin/python -m bench.experiments.nic_table --checkpoint /tmp/lenet_nic.pt \
        --adv /tmp/nic_adv_test.npz --variant both --variant value --variant provenance > /tmp/nic_table.jsonl

Each variant is instrumented exactly as ``harden instrument --method nic`` does (same key, default fpr 0.02),
exported with the parity check, and the cached adversarial examples of the TEST split
(``bench/experiments/nic_attacks.py --split test``: the same inputs, attacks and seed ``harden evaluate --limit``
uses, so the same adversarial examples) are scored by onnxruntime.  Per attack: detection among the originally
correct inputs (``detect``), among the successful adversarial examples (``detect_successful``) and ROC-AUC of
``nic.score`` (clean test inputs against originally-correct adversarial ones, as ``harden evaluate``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bench.experiments.example import load_lenet, parse_sets

VARIANTS = {
    "both": {},
    "value": {"nic_invariants": "value"},
    "provenance": {"nic_invariants": "provenance"},
    "both-k3": {"nic_detectors": 3},
    "both-k5": {"nic_detectors": 5},
    "both-no-g": {"nic_transform": False},
    "both-no-output": {"nic_output": False},
    "both-gamma10": {"nic_gamma": 10.0, "nic_nu": 0.1},   # the most accurate setting measured, 4x the latency
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adv", required=True)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--set", action="append", default=[], help="extra option for every variant, name=json")
    parser.add_argument("--key", default="nic-bench")
    parser.add_argument("--fpr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.errors import HardenError
    from harden.evaluation.evaluate import roc_auc
    from harden.export import export_onnx
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options
    from harden.export.runtime import OnnxGraph

    base = parse_sets(args.set)
    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    with np.load(args.adv) as npz:
        adv = {k: npz[k] for k in npz.files}
    x, y = adv["x"], adv["y"]
    for variant in args.variant or ["both", "value", "provenance"]:
        extra = {**base, **VARIANTS[variant]}
        cpu, wall = time.process_time(), time.perf_counter()
        hardened = instrument(model, data, ["nic"], Options(key=args.key, fpr=args.fpr, extra=extra))
        fit = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
        try:
            result = export_onnx(hardened)
            run, parity = OnnxGraph(result.model.SerializeToString()).run, result.parity.max_abs_diff
        except HardenError as exc:  # report the variant anyway, scored by the torch + scikit-learn path
            run, parity = hardened.run, f"export refused: {exc}"
        clean = run(x)
        correct = clean["logits"].argmax(1) == y
        row = {"variant": variant, "extra": extra, "fit": fit,
               "fpr_test_limit": float(clean["alarm"].mean()),
               "fpr_test_all": hardened.facts["metrics"]["test_fpr"],
               "calibration_fpr": hardened.facts["metrics"]["calibration_fpr"],
               "parity_max_abs_diff": parity,
               "probe_accuracy": hardened.method("nic").config.get("probe_accuracy"), "attacks": {}}
        for name in [k[4:] for k in adv if k.startswith("adv/")]:
            out = run(adv[f"adv/{name}"])
            wrong = out["logits"].argmax(1) != y
            successful = correct & wrong
            row["attacks"][name] = {
                "accuracy": float((~wrong).mean()),
                "n_correct": int(correct.sum()), "n_successful": int(successful.sum()),
                "detect": float(out["alarm"][correct].mean()),
                "detect_successful": float(out["alarm"][successful].mean()) if successful.any() else None,
                "auc": roc_auc(clean["nic.score"], out["nic.score"][correct]),
                "mean_l2": float(np.sqrt(((adv[f"adv/{name}"] - x) ** 2).reshape(len(x), -1).sum(1))[correct].mean()),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
