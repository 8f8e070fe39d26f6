"""docs/results/nic.md: adversarial examples of the example LeNet-5, cached (npz) for nic_fusion and nic_heldout_fit."""

# The first --limit inputs of the split (seed-0 split of load_data("mnist"), the one harden instrument makes) are
# attacked with harden's ART wrappers; the npz holds x, y, clean_pred and, per attack label, adv/<label> and
# pred/<label>.  Prints JSON: per attack the success rate and seconds.


from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bench.experiments.example import load_lenet

ATTACKS = ["fgsm:eps=0.1", "bim:eps=0.1", "pgd:eps=0.1", "deepfool", "cw"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="calibration", choices=["train", "calibration", "test"])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--attack", action="append", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.attacks.catalog import parse_attack, run_attack
    from harden.io.data import load_data

    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    part = getattr(data, args.split)
    x, y = part.x[: args.limit].numpy(), part.y[: args.limit].numpy()
    with torch.no_grad():
        clean_pred = model(torch.from_numpy(x)).argmax(1).numpy()
    arrays = {"x": x, "y": y, "clean_pred": clean_pred}
    report = {}
    for label in args.attack or ATTACKS:
        spec = parse_attack(label)
        started = time.perf_counter()
        adv = run_attack(model, spec, x, y, input_range=data.input_range, num_classes=data.num_classes, seed=0)
        with torch.no_grad():
            pred = model(torch.from_numpy(adv)).argmax(1).numpy()
        arrays[f"adv/{label}"] = adv
        arrays[f"pred/{label}"] = pred
        ok = clean_pred == y
        report[label] = {"success_on_correct": float((pred[ok] != y[ok]).mean()),
                         "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps({label: report[label]}), flush=True)
    np.savez_compressed(args.out, **arrays)
    print(json.dumps({"out": args.out, "clean_accuracy": float((clean_pred == y).mean()), "attacks": report}))


if __name__ == "__main__":
    main()
