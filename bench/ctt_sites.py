"""Which of ctt-lite's sites carry its detection: every site, the deepest K, the others.

    python bench/ctt_sites.py --pair resnet18-shapes --eps 0.005,0.02,0.05
    python bench/ctt_sites.py --pair resnet-shapes --eps 0.005,0.02,0.05 --deepest 4

ctt-lite is instrumented on every site of the suite pair; its raw score restricted to a subset of sites is the
max over that subset's traps of (activation - natural maximum).  Per subset the threshold is the 98th percentile
of that score on clean calibration inputs (the suite's 2% FPR), and a cell is the share of successful ART FGSM /
PGD examples (made from the first ``--limit`` calibration inputs at each eps) scoring above it.  Feeds the
"Which sites" paragraph of docs/results/ctt.md (the ``layers`` default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.output import emit  # noqa: E402
from bench.suite.pairs import load_pair  # noqa: E402
from bench.suite.run import SUITE_KEY, build_options  # noqa: E402
from harden.attacks.catalog import AttackSpec, run_attack  # noqa: E402
from harden.graph.analyse import collect  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402

CLEAN = 600        # clean calibration inputs that set each subset's threshold (after the attacked ones)
FPR = 0.02


def site_scores(hardened, x: torch.Tensor) -> np.ndarray:
    """[N, sites]: per site, the max over its traps of (activation - threshold)."""
    method = hardened.methods[0]
    index = {s: i for i, s in enumerate(method.sites)}
    out = collect(hardened.classifier, list(method.sites), x,
                  lambda site, a: method.head.excess(index[site], a).amax(dim=1, keepdim=True))
    return torch.cat([out[s] for s in method.sites], dim=1).numpy()


def subsets(count: int, deepest: int) -> dict[str, list[int]]:
    every = list(range(count))
    return {"all": every, f"deepest {deepest}": every[-deepest:], "the others": every[:-deepest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", required=True)
    parser.add_argument("--eps", default="0.005,0.02,0.05", help="comma-separated L-inf radii")
    parser.add_argument("--deepest", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100, help="calibration inputs attacked")
    parser.add_argument("--attacks", default="fgsm,pgd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lp = load_pair(args.pair)
    names, options = build_options("ctt-lite", ["layers=all"], None, 0, SUITE_KEY)
    hardened = instrument(lp.model, lp.data, names, options)
    model = hardened.classifier
    cal = lp.data.calibration
    clean = site_scores(hardened, cal.x[args.limit:args.limit + CLEAN])
    x, y = cal.x[:args.limit], cal.y[:args.limit]
    with torch.no_grad():
        right = model(x).argmax(1) == y
    groups = subsets(clean.shape[1], min(args.deepest, clean.shape[1]))
    rows = []
    for eps in [float(e) for e in args.eps.split(",")]:
        for attack in args.attacks.split(","):
            x_adv = torch.from_numpy(run_attack(model, AttackSpec(attack, {"eps": eps}), x.numpy(), y.numpy(),
                                                input_range=lp.data.input_range, num_classes=lp.data.num_classes))
            with torch.no_grad():
                fooled = right & (model(x_adv).argmax(1) != y)
            adversarial = site_scores(hardened, x_adv[fooled]) if fooled.any() else np.zeros((0, clean.shape[1]))
            row = {"attack": attack, "eps": eps, "successful": int(fooled.sum())}
            for name, columns in groups.items():
                if not columns:
                    continue
                threshold = np.quantile(clean[:, columns].max(axis=1), 1 - FPR)
                row[name] = (round(float((adversarial[:, columns].max(axis=1) > threshold).mean()), 3)
                             if len(adversarial) else None)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    emit({"pair": args.pair, "sites": clean.shape[1], "limit": args.limit, "clean": CLEAN, "fpr": FPR,
          "rows": rows}, args.out)


if __name__ == "__main__":
    main()
