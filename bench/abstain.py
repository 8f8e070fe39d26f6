"""The abstain detector (``--method abstain``) at a network's working eps E, beside the robust-trained ctt-strict
baseline of bench/detect_or_robust.py (its JSON document in out/dor/).

    OMP_NUM_THREADS=1 python bench/abstain.py --pair example [--set loss=ce] [--grid] [--adaptive-limit 100]
    python bench/abstain.py --markdown out/abstain/*.json

``--pair`` as bench/detect_or_robust.py (``example``: the example LeNet-5; any other name: a bench/suite pair).
E defaults to the working eps that bench found (out/dor/<pair>-test.json).  The bundle is instrumented with
``abstain:eps=E`` plus ``--set`` options, key ``dor-bench-key``, and cached in out/abstain/.  Reported, on
``--split`` (test): clean accuracy and the calibrated alarm's FPR on the whole split (the original model's
accuracy beside), and on its first ``--limit`` inputs ``harden certify``'s robust / detect-or-robust /
always-alarm fractions (``--bounds``, default crown) at E (``--grid``: over bench/detect_or_robust.py's eps grid),
the sampling check (``--check`` points per box), and optionally the adaptive attack at L-inf E.
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
from bench.detect_or_robust import GRID, KEY, _number, _pct, load  # noqa: E402
from harden.bundle.archive import load_bundle, save_bundle  # noqa: E402
from harden.certification.bundle import certified_alarms  # noqa: E402
from harden.certification.certify import certify_samples, check_certificates  # noqa: E402
from harden.instrumentation.hardened import original_classifier  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402
from harden.methods.base import MethodSpec, Options  # noqa: E402


def baseline(pair: str) -> dict:
    path = ROOT / "out" / "dor" / f"{pair}-test.json"
    return json.loads(path.read_text()) if path.exists() else {}


def bundle(pair: str, model, data, eps: float, sets: dict, fresh: bool, seed: int = 0):
    tag = "-".join([pair, f"abstain-{eps:g}"] + [f"{k}={v}" for k, v in sorted(sets.items())]
                   + ([f"seed={seed}"] if seed else []))
    path = ROOT / "out" / "abstain" / f"{tag}.hardened"
    if path.exists() and not fresh:
        return load_bundle(path)[0], tag
    hardened = instrument(model, data, [MethodSpec.of("abstain", eps=eps, **sets)], Options(key=KEY, seed=seed),
                          progress=lambda m, f: print(m, file=sys.stderr, flush=True) if "|" in m else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(hardened, path)
    return hardened, tag


def measure(args) -> dict:
    model, data = load(args.pair)
    base = baseline(args.pair)
    eps = args.eps if args.eps is not None else base.get("eps")
    if eps is None:
        raise SystemExit(f"no working eps for {args.pair}: give --eps (or run bench/detect_or_robust.py first)")
    sets = {k: _number(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    started = time.perf_counter()
    hardened, tag = bundle(args.pair, model, data, eps, sets, args.fresh, args.seed)
    seconds = time.perf_counter() - started
    part = getattr(data, args.split)
    with torch.no_grad():
        accuracy = float((hardened.classifier(part.x).argmax(1) == part.y).float().mean())
        original_accuracy = float((original_classifier(hardened)(part.x).argmax(1) == part.y).float().mean())
    out = hardened.run(part.x)
    fpr = float(out["alarm"].mean())
    x, y = part.x[: args.limit], part.y[: args.limit]
    alarms = certified_alarms(hardened)
    width = float(data.input_range[1] - data.input_range[0])
    grid = [g * width for g in GRID] if args.grid else [eps]
    curve = []
    for value in grid:
        r = certify_samples(hardened.classifier, [], x, y, value, data.input_range, bounds=args.bounds,
                            abstain=alarms.abstain)
        curve.append({"eps": value, **r["fractions"]})
    result = {"pair": args.pair, "tag": tag, "split": args.split, "limit": args.limit, "bounds": args.bounds,
              "eps": eps, "sets": sets, "seed": args.seed, "accuracy": accuracy, "original_accuracy": original_accuracy, "fpr": fpr,
              "threshold": hardened.facts["thresholds"]["abstain"], "instrument_seconds": round(seconds, 1),
              "finetune": {k: v for k, v in hardened.methods[0].config["finetune"].items()
                           if k in ("kept_check", "kept_step", "loss", "bounds", "lr", "steps")},
              "curve": curve}
    if args.check:
        c = check_certificates(hardened.classifier, [], x, y, eps, data.input_range, args.check, bounds=args.bounds,
                               abstain=alarms.abstain)
        result["check"] = {"points": c.points, "violations": c.violations}
    if args.adaptive_limit:
        from bench.detect_or_robust import adaptive

        result["adaptive"] = adaptive(hardened, data, args.split, eps, args.adaptive_limit, args.adaptive_steps,
                                      args.bounds)
    b = base.get("bundles", {}).get("robust")
    if b:
        at = next((r for r in b["curve"] if abs(r["eps"] - eps) < 1e-12), None)
        result["baseline"] = {"robust_trained_robust": at and at["robust"], "original_robust": at and at["original_robust"],
                              "robust_trained_accuracy": b["accuracy"], "robust_trained_fpr": b["fpr"]}
    return result


def markdown(paths: list[Path]) -> str:
    docs = [json.loads(p.read_text()) for p in paths]
    out = ["| pair | E | options | accuracy (original) | FPR | robust at E | detect-or-robust at E | always alarms | "
           "robust-trained baseline: robust at E |",
           "|---|---|---|---|---|---|---|---|---|"]
    for d in docs:
        at = next(r for r in d["curve"] if abs(r["eps"] - d["eps"]) < 1e-12)
        sets = {"loss": d["finetune"]["loss"], **d["sets"]}   # the loss as trained (its default changed once)
        options = ", ".join(f"{k}={v}" for k, v in sorted(sets.items()))
        base = d.get("baseline") or {}
        out.append(f"| {d['pair']} | {d['eps']:g} | {options} | {_pct(d['accuracy'])} ({_pct(d['original_accuracy'])}) "
                   f"| {_pct(d['fpr'])} | {_pct(at['robust'])} | {_pct(at['detect_or_robust'])} | "
                   f"{_pct(at['always_alarm'])} | {_pct(base.get('robust_trained_robust'))} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="example")
    ap.add_argument("--split", default="test", choices=("test", "calibration"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bounds", default="crown", choices=("ibp", "crown-ibp", "crown"))
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--grid", action="store_true", help="certify over bench/detect_or_robust.py's eps grid too")
    ap.add_argument("--set", action="append", default=[], help="key=value abstain option; repeatable")
    ap.add_argument("--check", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="--seed of harden instrument (batch order, the row's start)")
    ap.add_argument("--adaptive-limit", type=int, default=0)
    ap.add_argument("--adaptive-steps", type=int, default=100)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, nargs="*", default=None)
    args = ap.parse_args(argv)
    measure_or_tabulate(args, measure, markdown)


if __name__ == "__main__":
    main()
