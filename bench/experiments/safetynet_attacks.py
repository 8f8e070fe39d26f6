"""Cache adversarial examples of the example LeNet-5 on bundled MNIST for the SafetyNet design experiments.

    python bench/experiments/safetynet_attacks.py --checkpoint /tmp/safetynet/lenet.pt --out /tmp/safetynet/adv.npz

Train split: the first --train inputs (those SafetyNet's fit would use); test split: the first --test inputs
(what ``harden evaluate --limit`` attacks). Every attack runs against the plain classifier with
``harden.attacks.catalog.run_attack`` (seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.attacks.catalog import parse_attack, run_attack  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from bench.experiments.example import load_lenet

ATTACKS = ["fgsm:eps=0.1", "bim:eps=0.1", "pgd:eps=0.1", "deepfool", "cw"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--attack", action="append", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("mnist", seed=0)
    model = load_lenet(args.checkpoint)
    arrays = {}
    if args.out.exists():
        arrays = dict(np.load(args.out))
    for split, n in (("train", args.train), ("test", args.test)):
        part = getattr(data, split)
        x, y = part.x[:n].numpy(), part.y[:n].numpy()
        for text in args.attack or ATTACKS:
            key = f"{split}/{text}"
            if key in arrays:
                continue
            t0 = time.perf_counter()
            arrays[key] = run_attack(model, parse_attack(text), x, y, input_range=data.input_range,
                                     num_classes=data.num_classes, seed=0)
            with torch.no_grad():
                fooled = float((model(torch.from_numpy(arrays[key])).argmax(1).numpy() != y).mean())
            print(json.dumps({"key": key, "fooled": fooled, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
            np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
