"""docs/results/certify.md "No attack breaks a certificate": crown-certified vs PGD-broken test digits of the example LeNet-5."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.experiments.example import load_lenet  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("eps", type=float, nargs="?", default=0.01, help="L-inf radius")
    parser.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    parser.add_argument("--limit", type=int, default=200, help="the first N test digits")
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    from harden.certification.certify import certify_samples
    from harden.graph.trace import trace
    from harden.io.data import load_data

    data = load_data("mnist", seed=0)
    model = load_lenet(args.checkpoint)
    x, y = data.test.x[: args.limit], data.test.y[: args.limit]
    robust = certify_samples(trace(model), [], x, y, args.eps, data.input_range, bounds="crown")["robust"].numpy()
    classifier = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=data.num_classes, clip_values=data.input_range)
    broken = np.zeros(len(x), bool)
    for _ in range(args.restarts):   # PGD: 60 steps of eps/8 from a random start, per restart
        attack = ProjectedGradientDescent(classifier, eps=args.eps, eps_step=args.eps / 8, max_iter=60,
                                          num_random_init=1, verbose=False)
        adv = attack.generate(x.numpy(), y=y.numpy())
        with torch.no_grad():
            broken |= model(torch.from_numpy(adv)).argmax(1).numpy() != y.numpy()
    print(json.dumps({"eps": args.eps, "certified": int(robust.sum()), "pgd_broken": int(broken.sum()),
                      "certified_and_broken": int((robust & broken).sum()),
                      "neither": int((~robust & ~broken).sum())}))


if __name__ == "__main__":
    main()
