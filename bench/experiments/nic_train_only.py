"""A LeNet-5 trained on the TRAINING split only, to see NIC's FPR and detection when calibration and test digits are
both unseen by the classifier.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.experiments.nic_train_only --out /tmp/nicd/lenet_train_only.pt

The example checkpoint (harden/examples/train_lenet.py) is trained on the train + calibration splits of seed 0, so its
calibration digits are training digits of the classifier and its test digits are not: a detector calibrated on
the former sees the latter as a different population (docs/results/nic.md, "FPR drift").  This trains the same
network with the same recipe (harden.examples.train_lenet's epochs, batch, learning rate, seed) on the 3,000 training
digits alone; prints JSON with its test accuracy.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from harden.examples.lenet import LeNet5
    from harden.examples.train_lenet import BATCH, EPOCHS, LR, accuracy
    from harden.io.data import load_data

    torch.manual_seed(args.seed)
    data = load_data("mnist", seed=0)
    x, y = data.train.x, data.train.y
    model = LeNet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    torch.save(model.state_dict(), args.out)
    print(json.dumps({"out": args.out, "train_accuracy": accuracy(model, x, y),
                      "calibration_accuracy": accuracy(model, data.calibration.x, data.calibration.y),
                      "test_accuracy": accuracy(model, data.test.x, data.test.y)}))


if __name__ == "__main__":
    main()
