"""docs/results/detect-or-robust.md: does detection add to the certificate when more neurons are traps?  Fine-tune a suite pair with ctt-strict and
an objective at one eps and mask ratio, then certify (ibp and crown) at eps / 2, eps and 2 eps on the test split.

    OMP_NUM_THREADS=1 python bench/experiments/dor_trap_ratio.py cnn-digits 0.02 detect-or-robust 0.3 detection_weight=0

Arguments: pair, eps, objective, mask ratio, then fine-tuning options as key=value.  Prints the calibration checks,
test accuracy and FPR, and per bound method and eps the hardened model's robust / detect-or-robust / always-alarm
fractions beside the original's robust fraction (200 test inputs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.suite.pairs import load_pair  # noqa: E402
from harden.api import ctt_traps, original_classifier  # noqa: E402
from harden.certification.certify import certify_samples  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402
from harden.methods.base import MethodSpec, Options  # noqa: E402


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    pair, eps, objective, ratio, *sets = argv
    loaded = load_pair(pair)
    data = loaded.data
    eps, ratio = float(eps), float(ratio)
    settings = {"objective": objective, "mask_ratio": ratio, "eps": eps,
                **{k: _value(v) for k, v in (s.split("=", 1) for s in sets)}}
    started = time.time()
    hardened = instrument(loaded.model, data, [MethodSpec.of("ctt-strict", **settings)], Options(key="k"))
    config = hardened.methods[0].config
    print("fit s", round(time.time() - started, 1), "kept check", config["finetune"]["best_epoch"],
          config["finetune"]["stop_reason"], "traps per site", config["counts"])
    for record in config["_history"]:
        print({k: record[k] for k in ("step", "cross_entropy", "l_d", "l_c", "accuracy", "fpr", "cal_l_c")})
    metrics = hardened.facts["metrics"]
    print("test accuracy", round(metrics["test_accuracy"], 4), "original", round(metrics["original_test_accuracy"], 4),
          "test FPR", round(metrics["test_fpr"], 4))
    x, y = data.test.x[:200], data.test.y[:200]
    for bounds in ("ibp", "crown"):
        for radius in (eps / 2, eps, eps * 2):
            h = certify_samples(hardened.classifier, ctt_traps(hardened), x, y, radius, data.input_range,
                                bounds=bounds)["fractions"]
            o = certify_samples(original_classifier(hardened), [], x, y, radius, data.input_range,
                                bounds=bounds)["fractions"]
            print(f"{bounds} eps {radius:g}: robust {h['robust']:.3f} detect-or-robust {h['detect_or_robust']:.3f} "
                  f"always {h['always_alarm']:.3f} | original robust {o['robust']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
