"""The thesis's certified defence against flow fields (001, section 4.2), measured: plain vs flow-certified models.

    python -m bench.flow --model two-layer --stage finetune --delta 0.5
    python -m bench.flow --model two-layer --stage attack --attack "stadv:targeted=true,budget=7"
    python -m bench.flow --model two-layer --stage certify --threat flow:delta=0.5 --bounds crown
    python -m bench.flow --model two-layer --stage sdp --threat flow:delta=0.1 --limit 20
    python -m bench.flow --model two-layer --stage tv --limit 8
    python -m bench.flow --model two-layer --stage crosscheck --threat flow:delta=0.5 --bounds crown --limit 300
    python -m bench.flow --model two-layer --table

Models: ``two-layer`` and ``lenet5`` (harden.examples, trained by ``harden.examples.train_lenet`` on the MNIST
train split, cached in bench/flow_cache/) and ``suite:PAIR`` (a bench.suite pair).  The certified model is the
plain one fine-tuned with ``--finetune flow:delta=D`` (:mod:`harden.train.flow_objective`, its defaults), cached
by delta.  Every stage measures both models on the first ``--limit`` inputs of the test split and adds its rows
to bench/flow_cache/<model>.json; ``--table`` prints them as markdown.  Each stage is one short job (run each under
the heavy lock on its own).

* attack: stAdv from the catalog's parameters (:mod:`harden.attacks.stadv`); targeted runs draw each input's
  target as ``run_attack`` does (seeded, never the label).  Reported: successes (target reached, or label lost)
  over all inputs, as the thesis counts them, and over the inputs the model classified correctly.
* certify: ``certify_samples`` over the threat (fraction robust), the bound method as given.
* sdp: the two-layer SDP certificate beside ibp and crown on the same inputs (margins and fractions, seconds).
* crosscheck: per input, certified (``--bounds``) against fooled by stAdv inside the same flow box (untargeted,
  ``delta`` = the threat's, no TV budget): an input both certified and fooled would be a soundness failure.
* tv: how much the TV relaxation narrows the plain model's first affine layer against the flow box alone (mean
  width), at a few (delta, tv) budgets and 4x4 / 8x8 translation cells; no certified model needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

CACHE = Path(__file__).resolve().parent / "flow_cache"


def _plain(model: str):
    """(traced plain classifier, dataset, description)."""
    from harden.graph.trace import trace
    from harden.io.data import load_data

    if model.startswith("suite:"):
        from bench.suite.pairs import load_pair

        lp = load_pair(model.split(":", 1)[1])
        return trace(lp.model.eval()), lp.data, f"bench.suite pair {lp.pair.name}"
    from harden.examples.train_lenet import MODELS, train

    if model not in MODELS:
        raise SystemExit(f"--model {model!r}: one of {', '.join(MODELS)} or suite:PAIR")
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{model}_mnist.pt"
    if not path.exists():
        train(path, model=model)
    net = MODELS[model]()
    net.load_state_dict(torch.load(path, weights_only=True))
    return trace(net.eval()), load_data("mnist", seed=0), f"harden.examples {model} (train_lenet defaults)"


def _certified(model: str, plain, data, delta: float, build: bool):
    from harden.train.flow_objective import finetune_flow, parse_objective

    path = CACHE / f"{model.replace(':', '_')}-flow-{delta:g}.pt"
    facts_path = path.with_suffix(".json")
    gm = copy.deepcopy(plain)
    if path.exists():
        gm.load_state_dict(torch.load(path, weights_only=True))
        return gm, json.loads(facts_path.read_text())
    if not build:
        raise SystemExit(f"no certified model for delta {delta:g}: run --stage finetune --delta {delta:g} first")
    facts = finetune_flow(gm, data, parse_objective(f"flow:delta={delta:g}"))
    torch.save(gm.state_dict(), path)
    facts_path.write_text(json.dumps(facts, indent=1))
    return gm, facts


def _results(model: str) -> tuple[Path, dict]:
    path = CACHE / f"{model.replace(':', '_')}.json"
    return path, (json.loads(path.read_text()) if path.exists() else {"model": model, "rows": []})


def _save(path: Path, results: dict, row: dict) -> None:
    results["rows"] = [r for r in results["rows"] if r["key"] != row["key"]] + [row]
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(row))


def _attack_success(gm, x, y, spec_text: str, seed: int) -> torch.Tensor:
    """Per input: stAdv reached its goal (a reached goal of a misclassified input counts too)."""
    return _run_stadv(gm, x, y, spec_text, seed)[0]


def _attack(gm, x, y, spec_text: str, seed: int) -> dict:
    started = time.perf_counter()
    success, tv = _run_stadv(gm, x, y, spec_text, seed)
    with torch.no_grad():
        correct = gm(x).argmax(1) == y
    return {"successes": int(success.sum()), "of": len(x), "successes_correct": int((success & correct).sum()),
            "correct": int(correct.sum()), "median_tv": float(tv.median()) if len(tv) else None,
            "seconds": round(time.perf_counter() - started, 1)}


def _run_stadv(gm, x, y, spec_text: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from harden.attacks.catalog import parse_attack
    from harden.attacks.stadv import StAdvSettings, stadv

    spec = parse_attack(spec_text)
    if spec.name != "stadv":
        raise SystemExit("--attack: a stadv spec")
    p = spec.resolved()
    settings = StAdvSettings(tau=p["tau"], budget=p["budget"], delta=p["delta"], targeted=p["targeted"],
                             kappa=p["kappa"], steps=p["steps"], search_steps=p["search_steps"], lr=p["lr"])
    k = int(gm(x[:1]).shape[1])
    labels = y.numpy()
    if settings.targeted:   # as harden.attacks.catalog.run_attack draws them
        labels = (labels + np.random.default_rng(seed).integers(1, k, size=len(labels))) % k
    goal = torch.from_numpy(labels.astype(np.int64))
    for p_ in gm.parameters():
        p_.requires_grad_(False)
    success, tvs = [], []
    for start in range(0, len(x), 250):
        r = stadv(gm, x[start:start + 250], goal[start:start + 250], settings)
        success.append(r.success)
        tvs.append(r.tv[r.success])
    return torch.cat(success), torch.cat(tvs)


def _tv_narrowing(gm, x) -> dict:
    from harden.bounds.flow_box import flow_box
    from harden.bounds.flow_tv import first_affine_layers, layer_bounds, stray_counts
    from harden.bounds.interval import Interval
    from harden.bounds.propagate import propagate

    layer = first_affine_layers(gm, tuple(x.shape[1:]))[0]
    h, w = x.shape[2:]
    out = []
    for delta, tv in ((0.5, 7.0), (1.0, 7.0), (1.0, 3.0)):
        box = flow_box(x, delta)
        plain = propagate(gm, box, record={layer.node}).nodes[layer.node]
        for cells in (4, 8):
            narrowed = layer_bounds(layer, x, delta, tv, cells=cells)
            lo, hi = torch.maximum(plain.lo, narrowed.lo), torch.minimum(plain.hi, narrowed.hi)
            out.append({"delta": delta, "tv": tv, "cells": cells,
                        "narrowing": 1 - float((hi - lo).mean() / (plain.hi - plain.lo).mean())})
    return {"key": f"tv {len(x)}", "stage": "tv", "n": len(x), "layer": layer.node, "rows": out,
            "stray_counts_tv7": dict(zip(("0.125", "0.25", "0.5"), stray_counts([0.125, 0.25, 0.5], 7.0, h, w)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="two-layer | lenet5 | suite:PAIR")
    parser.add_argument("--stage", choices=("finetune", "attack", "certify", "sdp", "tv", "crosscheck"))
    parser.add_argument("--delta", type=float, default=0.5, help="the certified model's training delta")
    parser.add_argument("--attack", default="stadv:targeted=true,budget=7")
    parser.add_argument("--threat", default=None, help="flow:delta=D[,tv=T] (default: the training delta)")
    parser.add_argument("--bounds", default="ibp")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path, results = _results(args.model)
    if args.table:
        print(render(results))
        return 0
    if args.stage is None:
        parser.error("--stage or --table")
    plain, data, what = _plain(args.model)
    results["description"] = what
    if args.stage == "tv":
        with torch.no_grad():
            _save(path, results, _tv_narrowing(plain, data.test.x[: args.limit]))
        return 0
    cert, facts = _certified(args.model, plain, data, args.delta, build=args.stage == "finetune")
    x, y = data.test.x[: args.limit], data.test.y[: args.limit]
    models = {"plain": plain, f"flow {args.delta:g}": cert}
    if args.stage == "finetune":
        with torch.no_grad():
            row = {"key": f"finetune {args.delta:g}", "stage": "finetune", "delta": args.delta,
                   "accuracy": {name: float((m(data.test.x).argmax(1) == data.test.y).float().mean())
                                for name, m in models.items()},
                   "kept_step": facts["kept_step"], "seconds": facts["seconds"],
                   "settings": facts["settings"], "history": facts["history"]}
        _save(path, results, row)
        return 0
    if args.stage == "attack":
        out = {name: _attack(m, x, y, args.attack, args.seed) for name, m in models.items()}
        _save(path, results, {"key": f"attack {args.attack} {args.delta:g} {args.limit}", "stage": "attack",
                              "attack": args.attack, "delta": args.delta, "n": len(x), "models": out})
        return 0
    from harden.certification.certify import certify_samples
    from harden.certification.flow import parse_threat

    threat = parse_threat(args.threat or f"flow:delta={args.delta:g}")
    if args.stage == "certify":
        out = {}
        for name, m in models.items():
            started = time.perf_counter()
            r = certify_samples(m, [], x, y, threat, None, bounds=args.bounds)
            with torch.no_grad():
                correct = m(x).argmax(1) == y
            out[name] = {"robust": r["fractions"]["robust"],
                         "robust_correct": float((r["robust"] & correct).float().mean()),
                         "seconds": round(time.perf_counter() - started, 1)}
        _save(path, results, {"key": f"certify {threat.label()} {args.bounds} {args.delta:g} {args.limit}",
                              "stage": "certify", "threat": threat.label(), "bounds": args.bounds,
                              "delta": args.delta, "n": len(x), "models": out})
        return 0
    if args.stage == "crosscheck":
        if threat.tv is not None:
            raise SystemExit("--stage crosscheck: a threat without tv (the attack's set must contain the certified one)")
        out = {}
        for name, m in models.items():
            cert = certify_samples(m, [], x, y, threat, None, bounds=args.bounds)
            fooled = _attack_success(m, x, y, f"stadv:delta={threat.delta:g},budget=0", args.seed)
            out[name] = {"certified": int(cert["robust"].sum()), "fooled": int(fooled.sum()),
                         "both": int((cert["robust"] & fooled).sum())}
        _save(path, results, {"key": f"crosscheck {threat.label()} {args.bounds} {args.delta:g} {args.limit}",
                              "stage": "crosscheck", "threat": threat.label(), "bounds": args.bounds, "n": len(x),
                              "models": out})
        return 0
    from harden.certification.sdp import certify_sdp

    out = {}
    for name, m in models.items():
        entry = {}
        for method in ("ibp", "crown", "sdp"):
            started = time.perf_counter()
            r = certify_sdp(m, x, y, threat, None) if method == "sdp" else certify_samples(m, [], x, y, threat, None,
                                                                                             bounds=method)
            entry[method] = {"robust": r["fractions"]["robust"], "mean_margin": float(r["margin"].double().mean()),
                             "seconds": round(time.perf_counter() - started, 1)}
            if method == "sdp":
                entry[method]["largest_sdp"] = r["sdp"]["largest"]
        out[name] = entry
    _save(path, results, {"key": f"sdp {threat.label()} {args.delta:g} {args.limit}", "stage": "sdp",
                          "threat": threat.label(), "delta": args.delta, "n": len(x), "models": out})
    return 0


def render(results: dict) -> str:
    lines = [f"### {results['model']} ({results.get('description', '')})", ""]
    for row in results["rows"]:
        if row["stage"] == "finetune":
            acc = row["accuracy"]
            lines.append(f"- fine-tuned at delta {row['delta']:g}: test accuracy " +
                         ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" ({row['seconds']:.0f} s)")
    attacks = [r for r in results["rows"] if r["stage"] == "attack"]
    if attacks:
        lines += ["", "| attack | model | successes / inputs | among correct | median TV | s |", "|---|---|---|---|---|---|"]
        for r in attacks:
            for name, m in r["models"].items():
                tv = "-" if m["median_tv"] is None else f"{m['median_tv']:.1f}"
                lines.append(f"| `{r['attack']}` | {name} | {m['successes']} / {m['of']} | "
                             f"{m['successes_correct']} / {m['correct']} | {tv} | {m['seconds']:.0f} |")
    certs = [r for r in results["rows"] if r["stage"] == "certify"]
    if certs:
        lines += ["", "| threat | bounds | model | certified | certified & correct | s |", "|---|---|---|---|---|---|"]
        for r in certs:
            for name, m in r["models"].items():
                lines.append(f"| `{r['threat']}` | {r['bounds']} | {name} | {m['robust']:.3f} | "
                             f"{m['robust_correct']:.3f} | {m['seconds']:.0f} |")
    sdps = [r for r in results["rows"] if r["stage"] == "sdp"]
    if sdps:
        lines += ["", "| threat | model | n | ibp | crown | sdp | mean margin ibp / crown / sdp | s ibp / crown / sdp |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sdps:
            for name, m in r["models"].items():
                lines.append(f"| `{r['threat']}` | {name} | {r['n']} | {m['ibp']['robust']:.2f} | "
                             f"{m['crown']['robust']:.2f} | {m['sdp']['robust']:.2f} | "
                             f"{m['ibp']['mean_margin']:.2f} / {m['crown']['mean_margin']:.2f} / "
                             f"{m['sdp']['mean_margin']:.2f} | {m['ibp']['seconds']:.0f} / {m['crown']['seconds']:.0f}"
                             f" / {m['sdp']['seconds']:.0f} |")
    for r in (r for r in results["rows"] if r["stage"] == "tv"):
        lines += ["", f"TV relaxation of `{r['layer']}` on {r['n']} test inputs: mean width narrowed against the flow "
                      f"box alone (stray counts K(s) at TV 7: {r['stray_counts_tv7']})", "",
                  "| delta | tv | 4x4 cells | 8x8 cells |", "|---|---|---|---|"]
        by = {(q["delta"], q["tv"], q["cells"]): q["narrowing"] for q in r["rows"]}
        for delta, tv in dict.fromkeys((q["delta"], q["tv"]) for q in r["rows"]):
            lines.append(f"| {delta:g} | {tv:g} | {100 * by[(delta, tv, 4)]:.1f}% | {100 * by[(delta, tv, 8)]:.1f}% |")
    checks = [r for r in results["rows"] if r["stage"] == "crosscheck"]
    if checks:
        lines += ["", "| threat | bounds | model | n | certified | fooled by stAdv in the same box | both |",
                  "|---|---|---|---|---|---|---|"]
        for r in checks:
            for name, m in r["models"].items():
                lines.append(f"| `{r['threat']}` | {r['bounds']} | {name} | {r['n']} | {m['certified']} | "
                             f"{m['fooled']} | {m['both']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
