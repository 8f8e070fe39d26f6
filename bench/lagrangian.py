"""detect-or-robust with the Lagrangian bound (harden.bounds.lagrangian) against the caps alone and robust, on the
bundles bench/detect_or_robust.py made (out/dor/), with what limits it: how many uncertified boxes hold a trap
that can fire at all.

    OMP_NUM_THREADS=1 python bench/lagrangian.py --bundles out/dor --pair example --out /tmp/lag-example.json
    python bench/lagrangian.py --markdown /tmp/lag-*.json

Per bundle (``<pair>-<objective>-*.hardened``) and eps of bench/detect_or_robust.py's grid, on the first
``--limit`` inputs of the test split, ``--bounds`` (crown): robust, detect-or-robust with the caps only (what
certify reported before the Lagrangian), detect-or-robust with the Lagrangian (``--steps`` Adam steps), and
seconds: the two bound passes (plain, capped) and the Lagrangian's extra time, per input.  ``reachable``: among
the inputs not certified by the caps, those where some trap's upper bound over the box (plain pass) exceeds its
threshold, i.e. where the quiet region is smaller than the box at all (elsewhere no bound can beat robust).
``rows`` / ``rows_moved``: the (input, wrong class) rows the Lagrangian optimised (inputs not certified, not
misclassified-and-quiet) and those whose multipliers left 0 at all (some trap above its limit at the worst case
of the relaxed margin; for the others lambda = 0 is where projected ascent stays).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.output import measure_or_tabulate  # noqa: E402
from harden.api import ctt_traps  # noqa: E402
from harden.bundle.archive import load_bundle  # noqa: E402
from harden.certification import certify as C  # noqa: E402
from harden.bounds.margin import final_linear  # noqa: E402

GRID = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1)


def pair_data(pair: str):
    if pair == "example":
        from harden.io.data import load_data

        return load_data("mnist")
    from bench.suite.pairs import PAIRS, load_pair_data

    return load_pair_data(PAIRS[pair])


def one(hardened, x, y, eps, input_range, bounds: str, steps: int) -> dict:
    gm, traps = hardened.classifier, ctt_traps(hardened)
    engine, fold = C._engine(gm, bounds), final_linear(gm)
    threat = C.as_input_set(eps, input_range)
    rows = slice(0, len(x))
    with torch.no_grad():
        start = time.perf_counter()
        b = C._bound_batch(gm, traps, x, y, threat, rows, fold, set(), engine, bounds, lagrangian_steps=0)
        base = time.perf_counter() - start
        certified = b.detect_or_robust
        start = time.perf_counter()
        stats: dict = {}
        lag = C._lagrangian_margin(gm, traps, x, y, b.clamped, fold, engine, certified, steps, stats)
        extra = time.perf_counter() - start
    with_lag = certified | (lag > 0)
    reach = C.traps_may_fire(b.plain, traps, len(x), x.device)
    return {"eps": eps, "robust": float(b.robust.float().mean()), "dor_caps": float(certified.float().mean()),
            "dor_lagrangian": float(with_lag.float().mean()), "always_alarm": float(b.always_alarm.float().mean()),
            "uncertified": int((~certified).sum()), "uncertified_reachable": int((~certified & reach).sum()),
            "gained": int((with_lag & ~certified).sum()), "rows": stats.get("rows", 0), "rows_moved": stats.get("moved", 0),
            "rows_dropped": stats.get("dropped", 0),
            "seconds_per_input_bounds": base / len(x), "seconds_per_input_lagrangian": extra / len(x)}


def measure(args) -> dict:
    from harden.bounds import lagrangian

    lagrangian.LR = args.lr
    data = pair_data(args.pair)
    width = float(data.input_range[1] - data.input_range[0])
    part = data.test
    x, y = part.x[: args.limit], part.y[: args.limit].to(torch.int64)
    doc = {"pair": args.pair, "limit": args.limit, "bounds": args.bounds, "steps": args.steps, "lr": args.lr,
           "bundles": {}}
    for path in sorted(Path(args.bundles).glob(f"{args.pair}-*.hardened")):
        if (args.only and not any(o in path.name for o in args.only)) or any(o in path.name for o in args.exclude):
            continue
        hardened = load_bundle(path)[0]
        rows = []
        for g in args.grid or GRID:
            rows.append(one(hardened, x, y, g * width, data.input_range, args.bounds, args.steps))
            print(path.stem, json.dumps(rows[-1]), file=sys.stderr, flush=True)
        doc["bundles"][path.stem] = rows
    return doc


def markdown(paths: list[Path]) -> str:
    out = []
    for p in paths:
        doc = json.loads(p.read_text())
        out += ["", f"**{doc['pair']}** (test, first {doc['limit']}, `--bounds {doc['bounds']}`, {doc['steps']} "
                    f"Adam steps, lr {doc['lr']}): robust / detect-or-robust caps only / detect-or-robust Lagrangian, "
                    "%; uncertified (reachable); Lagrangian seconds per input", "",
                "| bundle | eps | robust | caps | Lagrangian | uncertified (a trap can fire) | rows (lambda moved) | "
                "s/input bounds | s/input Lagrangian |", "|---|---|---|---|---|---|---|---|---|"]
        for name, rows in doc["bundles"].items():
            for r in rows:
                out.append(f"| {name} | {r['eps']:g} | {100 * r['robust']:.1f} | {100 * r['dor_caps']:.1f} | "
                           f"{100 * r['dor_lagrangian']:.1f} | {r['uncertified']} ({r['uncertified_reachable']}) | "
                           f"{r.get('rows', '-')} ({r.get('rows_moved', '-')}) | "
                           f"{r['seconds_per_input_bounds']:.4f} | {r['seconds_per_input_lagrangian']:.4f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="example")
    ap.add_argument("--bundles", default=str(ROOT / "out" / "dor"))
    ap.add_argument("--only", action="append", default=[], help="substring of the bundle names to keep; repeatable")
    ap.add_argument("--exclude", action="append", default=[], help="substring of the bundle names to drop")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bounds", default="crown", choices=("crown-ibp", "crown"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--grid", type=lambda s: [float(v) for v in s.split(",")], default=None,
                    help="eps grid as fractions of the input range's width")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, nargs="*", default=None)
    args = ap.parse_args(argv)
    measure_or_tabulate(args, measure, markdown)


if __name__ == "__main__":
    main()
