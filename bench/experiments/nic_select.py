"""Choose NIC's defaults by measurement across attacks: a grid of settings, each instrumented on LeNet-5 / MNIST.

    .venv/bin/python -m bench.experiments.nic_select --checkpoint /tmp/lenet_nic.pt \
        --adv /tmp/nic_adv_calibration.npz --grid nu_gamma > /tmp/nic_select.jsonl

The adversarial examples (``bench/experiments/nic_attacks.py``) are made on the CALIBRATION split, never the test
split that the results are reported on.  For each setting the method is fitted (training split only) and
calibrated to --fpr on the calibration split exactly as ``harden instrument`` does; then, per attack:

* ``detect``: alarm rate on successful adversarial examples (originally correct, misclassified after the attack);
* ``detect_all``: alarm rate on every adversarial example of an originally correct input;
* ``auc``: ROC-AUC of the NIC score, successful adversarial examples against the clean calibration inputs.

One JSON line per setting, with ``min_detect`` and ``mean_detect`` over attacks; the defaults are the setting with
the best worst-attack detection (ties: best mean), never the best on one attack.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from bench.experiments.example import load_lenet, parse_sets

GRIDS = {
    "nu_gamma": [{"nic_nu": nu, "nic_gamma": g} for nu, g in itertools.product([0.01, 0.05, 0.1, 0.2], [0.3, 1.0, 3.0])],
    "reduce": [{"nic_reduce": r} for r in ("mean", "max", "meanmax")],
    "nu_gamma_reduce": [{"nic_nu": nu, "nic_gamma": g, "nic_reduce": r}
                        for r, nu, g in itertools.product(("mean", "max", "meanmax"), [0.01, 0.05], [3.0, 10.0])],
    "gamma_hi": [{"nic_nu": nu, "nic_gamma": g} for nu, g in itertools.product([0.02, 0.05, 0.1], [10.0, 30.0])],
    "final": [{"nic_final_nu": nu, "nic_final_gamma": g} for nu, g in itertools.product([0.02, 0.1, 0.2], [0.3, 1.0, 3.0])],
    "holdout": [{"nic_holdout": h} for h in (0.0, 1 / 3, 0.5)],
    "output": [{"nic_output": o} for o in (False, True)],
    "ramp": [{"nic_ramp": r} for r in (0.05, 0.2, 0.5)],
    "cheap": [{"nic_nu": nu, "nic_gamma": g} for nu, g in ((0.02, 1.0), (0.02, 2.0), (0.05, 1.0), (0.01, 1.0))],
    # support-vector budget (latency): fewer training rows and a smaller nu both mean fewer support vectors
    "budget": [{"nic_nu": nu, "max_train": m} for nu, m in ((0.02, 4000), (0.02, 1000), (0.05, 1000), (0.1, 1000),
                                                            (0.02, 500), (0.05, 500))],
    "output_nu_gamma": [{"nic_output": True, "nic_nu": nu, "nic_gamma": g}
                        for nu, g in itertools.product([0.02, 0.1], [0.3, 1.0, 3.0])],
    "transform": [{"nic_transform": t} for t in (False, True)],
    "invariants": [{"nic_invariants": i} for i in ("value", "provenance", "both")],
    "sets": [{"nic_detectors": k} for k in (1, 3, 5)],
}


def measure(model, data, adv: list[dict], extra: dict, base: dict, fpr: float, key: str) -> dict:
    from harden.evaluation.evaluate import roc_auc as auc
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import Options

    options = Options(key=key, fpr=fpr, extra={**base, **extra})
    started = time.process_time()
    wall = time.perf_counter()
    hardened = instrument(model, data, ["nic"], options)
    fit_cpu = time.process_time() - started
    clean = hardened.run(data.calibration.x)["nic.score"]
    row = {"extra": extra, "fit_cpu_s": round(fit_cpu, 1), "fit_wall_s": round(time.perf_counter() - wall, 1),
           "calibration_fpr": hardened.facts["metrics"]["calibration_fpr"],
           "test_fpr": hardened.facts["metrics"]["test_fpr"],
           "probe_accuracy": hardened.methods[0].config.get("probe_accuracy"), "attacks": {}}
    for arrays in adv:
        y, clean_pred = arrays["y"], arrays["clean_pred"]
        correct = clean_pred == y
        for name in sorted(k[4:] for k in arrays if k.startswith("adv/")):
            success = correct & (arrays[f"pred/{name}"] != y)
            if not success.any():
                continue  # an attack that never succeeded says nothing about detection
            out = hardened.run(arrays[f"adv/{name}"])
            row["attacks"][name] = {
                "n": int(success.sum()),
                "detect": float(out["nic.alarm"][success].mean()),
                "detect_all": float(out["nic.alarm"][correct].mean()),
                "auc": auc(clean, out["nic.score"][success]),
            }
    detects = [a["detect"] for a in row["attacks"].values()]
    row["min_detect"], row["mean_detect"] = float(np.min(detects)), float(np.mean(detects))
    row["mean_auc"] = float(np.mean([a["auc"] for a in row["attacks"].values()]))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adv", action="append", required=True,
                        help="npz from bench/experiments/nic_attacks.py (calibration split); repeatable")
    parser.add_argument("--grid", action="append", choices=sorted(GRIDS), default=None)
    parser.add_argument("--set", action="append", default=[], help="base option for every setting, name=json")
    parser.add_argument("--fpr", type=float, default=0.02)
    parser.add_argument("--key", default="nic-select")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.io.data import load_data

    base = parse_sets(args.set)
    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    adv = []
    for path in args.adv:
        with np.load(path) as npz:
            adv.append({k: npz[k] for k in npz.files})
    for grid in args.grid or ["nu_gamma"]:
        for extra in GRIDS[grid]:
            row = measure(model, data, adv, extra, base, args.fpr, args.key)
            print(json.dumps({"grid": grid, "base": base, **row}), flush=True)


if __name__ == "__main__":
    main()
