"""docs/results/mismatch.md "second_recipe=fgsm": how often candidate second models disagree with the classifier on its adversarial examples."""

#     python -m bench.experiments.mismatch_second --bundle /tmp/mm/mm_pool.hardened --pool /tmp/mm/pool
#
# Decision mismatch only works when an input that fools the classifier does NOT fool the second model the same way.
# For each candidate second model (trained on the training split like ``harden.methods.mismatch`` trains it, with a
# different training recipe), on the CALIBRATION pools of :mod:`bench.experiments.mismatch_pool` (attacks crafted on
# the classifier): the second model's clean accuracy and clean disagreement with the classifier (the natural false
# alarms a mismatch detector has to live with), and, among the successful adversarial examples, how often the
# second model still gives the true class ("right") and how often it disagrees with the classifier.

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.experiments.mismatch_common import DEGRADATIONS, GRADIENT_ATTACKS, predict
from bench.experiments.mismatch_pool import slug


CLASSIFIER: list = []  # the classifier, for the transfer recipes


def perturb(model, x, y, recipe: str, generator: torch.Generator, lo=0.0, hi=1.0) -> torch.Tensor:
    """The training batch the recipe feeds the model (clean rows are kept in every recipe but 'clean')."""
    if recipe == "clean":
        return x
    if recipe.startswith("gauss"):
        sigma = float(recipe[5:])
        return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(lo, hi)
    if recipe.startswith("xfgsm") or recipe.startswith("both"):
        # FGSM against the CLASSIFIER (transfer examples, true labels); "both" adds FGSM against the model itself.
        eps = float(recipe.split("@")[1])
        xa = perturb(CLASSIFIER[0], x, y, f"fgsm@{eps}", generator, lo, hi)
        if recipe.startswith("both"):
            xa = torch.cat([xa, perturb(model, x, y, f"fgsm@{eps}", generator, lo, hi)])
        return xa
    if recipe.startswith("fgsm") or recipe.startswith("pgd"):
        eps = float(recipe.split("@")[1])
        steps = 1 if recipe.startswith("fgsm") else 5
        step = eps if steps == 1 else 2.5 * eps / steps
        start = x if steps == 1 else (x + eps * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(lo, hi)
        adv = start.clone()
        was = model.training
        model.eval()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = (adv.detach() + step * grad.sign()).clamp(x - eps, x + eps).clamp(lo, hi)
        model.train(was)
        return adv.detach()
    raise ValueError(recipe)


def train(spec: dict, recipe: str, x, y, seed: int, epochs=60, patience=10):
    from harden.methods.mismatch import SECOND_BATCH, SECOND_HOLDOUT, SECOND_LR, build_second

    torch.manual_seed(seed)
    model = build_second(spec)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_hold = int(round(SECOND_HOLDOUT * len(x)))
    hold, fit = order[:n_hold], order[n_hold:]
    opt = torch.optim.Adam(model.parameters(), lr=SECOND_LR)
    best, best_acc, stale, best_epoch = None, -1.0, 0, 0
    for epoch in range(epochs):
        model.train()
        perm = fit[torch.randperm(len(fit), generator=g)]
        for s in range(0, len(perm), SECOND_BATCH):
            i = perm[s : s + SECOND_BATCH]
            xb, yb = x[i], y[i]
            if recipe != "clean":
                extra = perturb(model, xb, yb, recipe, g)
                reps = len(extra) // len(xb)
                xb = torch.cat([xb, extra])
                yb = yb.repeat(reps + 1)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        model.eval()
        acc = float((predict(model, x[hold].numpy()) == y[hold].numpy()).mean())
        if acc > best_acc:
            best, best_acc, stale, best_epoch = copy.deepcopy(model.state_dict()), acc, 0, epoch + 1
        else:
            stale += 1
        if stale >= patience:
            break
    model.load_state_dict(best)
    return model.eval().requires_grad_(False), best_epoch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--pool", required=True, type=Path)
    parser.add_argument("--candidate", action="append", default=None, help="kind:recipe, e.g. mlp:gauss0.3")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.api import bundle_data
    from harden.bundle.archive import load_bundle
    from harden.methods.mismatch import _candidate_specs

    hardened, manifest = load_bundle(args.bundle)
    classifier = hardened.classifier.eval()
    CLASSIFIER.append(classifier.requires_grad_(False))
    data = bundle_data(manifest)
    specs = {s["kind"]: s for s in _candidate_specs(data.input_shape, data.num_classes)}
    pools = {a: dict(np.load(args.pool / f"calibration_{slug(a)}.npz")) for a in GRADIENT_ATTACKS + DEGRADATIONS}
    xc, yc = data.calibration.x.numpy(), data.calibration.y.numpy()
    pc = predict(classifier, xc)
    candidates = args.candidate or ["mlp:clean", "mlp:gauss0.1", "mlp:gauss0.3", "mlp:fgsm@0.1", "mlp:pgd@0.1",
                                    "cnn:clean", "cnn:gauss0.3"]
    for cand in candidates:
        kind, recipe = cand.split(":")
        started = time.perf_counter()
        model, epoch = train(specs[kind], recipe, data.train.x, data.train.y, seed=0)
        ps = predict(model, xc)
        row = {"candidate": cand, "epochs": epoch, "seconds": round(time.perf_counter() - started, 1),
               "test_accuracy": round(float((predict(model, data.test.x.numpy()) == data.test.y.numpy()).mean()), 4),
               "calibration_disagreement": round(float((ps != pc).mean()), 4), "attacks": {}}
        for a, z in pools.items():
            ok = z["success"]
            sa, ca, y = predict(model, z["adv"][ok]), predict(classifier, z["adv"][ok]), z["y"][ok]
            row["attacks"][a] = {"right": round(float((sa == y).mean()), 3), "disagree": round(float((sa != ca).mean()), 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
