"""docs/results/mismatch.md: adversarial and degraded inputs against a mismatch bundle's two models, cached per attack and split."""

#     python -m bench.experiments.mismatch_pool --bundle /tmp/mm/mm.hardened --out /tmp/mm/pool \
#         [--train-images 1000] [--eval-limit 300] [--attack fgsm:eps=0.1 ...]
#
# The classifier and the second model are the bundle's (``harden instrument ... --method mismatch``).
#
# * ``train``: ``--train-images`` images of the training split (seeded choice); each attack picks, per image, one of
#   the two models at random (the paper's protocol) and attacks it.  Saved: ``x``, ``y``, ``adv``, ``target``
#   (0 classifier, 1 second model), ``success`` (the target was right on ``x`` and is wrong on ``adv``).
# * ``calibration`` and ``test``: the first ``--eval-limit`` images of the split, attacked against the classifier
#   only (what ``harden evaluate`` does).  Same fields, ``target`` all 0.
#
# Gradient attacks run through harden's ART wrappers; quality degradations (noise, blur, saltpepper) are the line
# searches of harden.attacks.degradations.  Prints one JSON line per attack and split.

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.experiments.mismatch_common import DEGRADATIONS, GRADIENT_ATTACKS, make_adversarial, predict


def slug(label: str) -> str:
    return label.replace(":", "_").replace("=", "").replace(",", "_")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--attack", action="append", default=None)
    parser.add_argument("--split", action="append", default=None, choices=["train", "calibration", "test"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harden.api import bundle_data
    from harden.bundle.archive import load_bundle

    hardened, manifest = load_bundle(args.bundle)
    classifier = hardened.classifier.eval()
    second = hardened.method("mismatch").head.second.eval()
    data = bundle_data(manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_rows = np.sort(rng.choice(len(data.train), min(args.train_images, len(data.train)), replace=False))

    for split in args.split or ["calibration", "test", "train"]:
        part = getattr(data, split)
        rows = train_rows if split == "train" else np.arange(min(args.eval_limit, len(part)))
        x, y = part.x[rows].numpy(), part.y[rows].numpy()
        canonical = GRADIENT_ATTACKS + DEGRADATIONS
        for label in args.attack or canonical:
            # Seeds follow the attack's place in the canonical list, so a pool made one attack at a time is the same.
            a = canonical.index(label) if label in canonical else len(canonical) + sum(map(ord, label))
            path = args.out / f"{split}_{slug(label)}.npz"
            if path.exists():
                continue
            started = time.perf_counter()
            if split == "train":
                target = np.random.default_rng(1000 + a).integers(2, size=len(x))
            else:
                target = np.zeros(len(x), dtype=np.int64)
            adv = np.empty_like(x)
            success = np.zeros(len(x), dtype=bool)
            for m, model in enumerate((classifier, second)):
                sel = np.flatnonzero(target == m)
                if len(sel) == 0:
                    continue
                adv[sel] = make_adversarial(model, label, x[sel], y[sel], seed=17 * a + m,
                                            input_range=data.input_range, num_classes=data.num_classes)
                success[sel] = (predict(model, x[sel]) == y[sel]) & (predict(model, adv[sel]) != y[sel])
            np.savez_compressed(path, x=x, y=y, rows=rows, adv=adv, target=target, success=success)
            print(json.dumps({"split": split, "attack": label, "n": len(x), "success": round(float(success.mean()), 3),
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
