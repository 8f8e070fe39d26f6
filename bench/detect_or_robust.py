"""Certified fraction against eps for three fine-tunings of one network: ctt-strict as shipped (objective ctt),
the certificate itself (objective detect-or-robust) and certified robustness alone (objective robust, traps
ignored), beside the adaptive attack's success at the working eps.

    OMP_NUM_THREADS=1 python bench/detect_or_robust.py --pair example [--split test] [--limit 200] [--json]
    python bench/detect_or_robust.py --plot out/dor/*-test.json --png docs/results/detect-or-robust.png
    python bench/detect_or_robust.py --markdown out/dor/*-test.json

``--pair example`` is the example LeNet-5 (``out/lenet5_mnist.pt``, bundled MNIST); any other name is a
bench/suite pair.  The working eps E: the smallest eps of the grid (``--grid``, fractions of the input range's
width) at which the ctt-strict bundle's certified robust fraction (``--bounds``, default crown) on the
**calibration** split is below 50% (``--eps`` overrides it); detect-or-robust and robust train at E with the
same step budget.  Then, on ``--split`` (``--limit`` inputs): per bundle and eps, ``harden certify``'s robust,
detect-or-robust and always-alarms fractions for the hardened model and the original; clean accuracy and the
calibrated alarm's FPR on the whole split; the adaptive attack at L-inf E (``--adaptive-limit`` inputs:
undefended, key-known, key-unknown success).  Bundles are cached in out/dor/ (``--fresh`` makes them again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.output import emit  # noqa: E402
from harden.api import ctt_traps, original_classifier  # noqa: E402
from harden.bundle.archive import load_bundle, save_bundle  # noqa: E402
from harden.certification.certify import certify_samples  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402
from harden.methods.base import MethodSpec, Options  # noqa: E402

KEY = "dor-bench-key"
GRID = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1)
OBJECTIVES = ("ctt", "robust", "detect-or-robust")


def load(pair: str):
    if pair == "example":
        from harden.examples.lenet import LeNet5
        from harden.io.data import load_data

        model = LeNet5()
        model.load_state_dict(torch.load(ROOT / "out/lenet5_mnist.pt", weights_only=True))
        return model.eval(), load_data("mnist")
    from bench.suite.pairs import load_pair

    loaded = load_pair(pair)
    return loaded.model, loaded.data


def bundle(pair: str, model, data, objective: str, eps, sets: dict, fresh: bool):
    """The ctt-strict bundle fine-tuned with ``objective`` at ``eps`` (the method's default eps for "ctt")."""
    tag = "-".join([pair, objective, str(eps)] + [f"{k}={v}" for k, v in sorted(sets.items())])
    path = ROOT / "out" / "dor" / f"{tag}.hardened"
    if path.exists() and not fresh:
        return load_bundle(path)[0]
    settings = {**({} if objective == "ctt" else {"objective": objective}), **sets,
                **({} if eps is None else {"eps": eps})}
    hardened = instrument(model, data, [MethodSpec.of("ctt-strict", **settings)], Options(key=KEY))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(hardened, path)
    return hardened


def curve(hardened, x, y, grid, input_range, bounds: str, original: dict[float, float]) -> list[dict]:
    """Per eps, harden certify's fractions for the hardened model; ``original`` caches the original model's
    robust fraction by eps (the same weights under every bundle)."""
    traps = ctt_traps(hardened)
    rows = []
    for eps in grid:
        h = certify_samples(hardened.classifier, traps, x, y, eps, input_range, bounds=bounds)["fractions"]
        if eps not in original:
            original[eps] = certify_samples(original_classifier(hardened), [], x, y, eps, input_range,
                                            bounds=bounds)["fractions"]["robust"]
        rows.append({"eps": eps, "robust": h["robust"], "detect_or_robust": h["detect_or_robust"],
                     "always_alarm": h["always_alarm"], "original_robust": original[eps]})
    return rows


def working_eps(hardened, data, grid, bounds: str, limit: int) -> tuple[float, list[dict]]:
    cal = data.calibration
    rows = []
    for eps in grid:
        robust = certify_samples(hardened.classifier, ctt_traps(hardened), cal.x[:limit], cal.y[:limit], eps,
                                 data.input_range, bounds=bounds)["fractions"]["robust"]
        rows.append({"eps": eps, "robust": robust})
        if robust < 0.5:
            return eps, rows
    return grid[-1], rows


def adaptive(hardened, data, split, eps: float, limit: int, steps: int, bounds: str) -> dict:
    """The adaptive attack's success rates at L-inf ``eps`` (``harden evaluate --adaptive``), and the key-known
    attack run once more on the inputs certified detect-or-robust at ``eps``: how many it breaks (fooled with no
    alarm in the exported graph) must be 0."""
    from harden.api import scorer_for
    from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
    from harden.evaluation.evaluate import evaluate_adaptive

    part = getattr(data, split)
    graph = scorer_for(hardened, None)
    x, y = part.x[:limit], part.y[:limit]
    settings = AdaptiveSettings(eps=eps, steps=steps)
    report = evaluate_adaptive(hardened, graph.run, x.numpy(), y.numpy(), settings, input_range=data.input_range,
                               num_classes=data.num_classes, reference=data.train.x)
    unknown = report.get("key_unknown", {})
    from harden.certification.bundle import certified_alarms

    alarms = certified_alarms(hardened)   # CTT traps and abstain detectors alike
    held = certify_samples(hardened.classifier, alarms.traps, x, y, eps, data.input_range, bounds=bounds,
                           abstain=alarms.abstain)["detect_or_robust"]
    broken = 0
    if held.any():
        def judge(batch):
            out = graph.run(batch)
            return out["logits"].argmax(1), out["alarm"]

        xs, ys = x[held].numpy(), y[held].numpy()
        attack = adaptive_attack(hardened, xs, ys, settings, input_range=data.input_range, judge=judge,
                                 reference=data.train.x)
        predicted, alarm = judge(attack["x_adv"])
        broken = int(((predicted != ys) & ~alarm).sum())
    return {"eps": eps, "n": len(x), "n_correct": report["n_correct"], "undefended": report["type_i"]["fooled"],
            "key_known": report["type_ii"]["success"], "key_unknown": unknown.get("success"),
            "certified": int(held.sum()), "certified_broken": broken}


def measure(args) -> dict:
    model, data = load(args.pair)
    width = float(data.input_range[1] - data.input_range[0])
    grid = [g * width for g in (args.grid or GRID)]
    sets = dict(kv.split("=", 1) for kv in args.set)
    sets = {k: _number(v) for k, v in sets.items()}
    result = {"pair": args.pair, "split": args.split, "limit": args.limit, "bounds": args.bounds, "sets": sets,
              "bundles": {}}
    shipped = bundle(args.pair, model, data, "ctt", None, {}, args.fresh)
    if args.eps is None:
        eps, search = working_eps(shipped, data, grid, args.bounds, args.limit)
        result["eps_search"] = search
    else:
        eps = args.eps
    result["eps"] = eps
    part = getattr(data, args.split)
    x, y = part.x[: args.limit], part.y[: args.limit]
    original: dict[float, float] = {}
    for objective in args.objectives:
        hardened = shipped if objective == "ctt" else bundle(args.pair, model, data, objective, eps, sets, args.fresh)
        metrics = hardened.facts["metrics"]
        with torch.no_grad():   # on the whole split
            accuracy = float((hardened.classifier(part.x).argmax(1) == part.y).float().mean())
            original_accuracy = float((original_classifier(hardened)(part.x).argmax(1) == part.y).float().mean())
        entry = {"accuracy": accuracy, "original_accuracy": original_accuracy, "fpr": metrics[f"{args.split}_fpr"],
                 "instrument_seconds": metrics.get("seconds"),
                 "finetune": {k: v for k, v in hardened.methods[0].config.get("finetune", {}).items()
                              if k in ("eps", "objective", "best_epoch", "best_step", "steps_taken", "stop_reason", "lr")},
                 "curve": curve(hardened, x, y, grid, data.input_range, args.bounds, original)}
        if args.adaptive_limit:
            entry["adaptive"] = adaptive(hardened, data, args.split, eps, args.adaptive_limit, args.adaptive_steps,
                                         args.bounds)
        result["bundles"][objective] = entry
        print(f"{args.pair} {objective}: done", file=sys.stderr, flush=True)
    return result


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plot(paths: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(docs), figsize=(4.2 * len(docs), 3.6), squeeze=False)
    styles = {"ctt": ("tab:gray", "ctt-strict (shipped)"), "robust": ("tab:blue", "fine-tuned: robust"),
              "detect-or-robust": ("tab:red", "fine-tuned: detect-or-robust")}
    for ax, doc in zip(axes[0], docs):
        for objective, entry in doc["bundles"].items():
            colour, label = styles[objective]
            eps = [r["eps"] for r in entry["curve"]]
            ax.plot(eps, [r["robust"] for r in entry["curve"]], color=colour, label=f"{label}, robust")
            ax.plot(eps, [r["detect_or_robust"] for r in entry["curve"]], color=colour, linestyle="--",
                    label=f"{label}, detect-or-robust")
        first = next(iter(doc["bundles"].values()))
        ax.plot([r["eps"] for r in first["curve"]], [r["original_robust"] for r in first["curve"]], color="black",
                linestyle=":", label="original, robust")
        ax.axvline(doc["eps"], color="tab:green", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{doc['pair']} ({doc['split']}, {doc['bounds']}, E={doc['eps']:g})", fontsize=9)
        ax.set_xlabel("eps (L-inf)")
        ax.set_ylabel("certified fraction")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(paths: list[Path]) -> str:
    """The tables of docs/results/detect-or-robust.md from this script's JSON documents."""
    docs = [json.loads(p.read_text()) for p in paths]
    names = {"ctt": "ctt-strict", "robust": "robust-trained", "detect-or-robust": "detect-or-robust-trained"}
    out = ["| pair | E | bundle | accuracy (original) | FPR | robust at E | detect-or-robust at E | "
           "adaptive at E: undefended / key-known / key-unknown | certified inputs the key-known attack broke |",
           "|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        for objective, entry in doc["bundles"].items():
            at = next(r for r in entry["curve"] if abs(r["eps"] - doc["eps"]) < 1e-12)
            a = entry.get("adaptive") or {}
            adaptive_cell = " / ".join(_pct(a.get(k)) for k in ("undefended", "key_known", "key_unknown")) if a else "-"
            broken = f"{a['certified_broken']} of {a['certified']}" if 'certified' in a else "-"
            out.append(f"| {doc['pair']} | {doc['eps']:g} | {names[objective]} | {_pct(entry['accuracy'])} "
                       f"({_pct(entry['original_accuracy'])}) | {_pct(entry['fpr'])} | {_pct(at['robust'])} | "
                       f"{_pct(at['detect_or_robust'])} | {adaptive_cell} | {broken} |")
    for doc in docs:
        out += ["", f"**{doc['pair']}** ({doc['split']} split, first {doc['limit']} inputs, `--bounds {doc['bounds']}`; "
                    f"E = {doc['eps']:g}): certified robust / detect-or-robust, %", "",
                "| eps | original | " + " | ".join(names[o] for o in doc["bundles"]) + " |",
                "|---|---|" + "---|" * len(doc["bundles"])]
        first = next(iter(doc["bundles"].values()))
        for i, row in enumerate(first["curve"]):
            cells = [f"{_pct(e['curve'][i]['robust'])} / {_pct(e['curve'][i]['detect_or_robust'])}"
                     for e in doc["bundles"].values()]
            mark = " **(E)**" if abs(row["eps"] - doc["eps"]) < 1e-12 else ""
            out.append(f"| {row['eps']:g}{mark} | {_pct(row['original_robust'])} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="example")
    ap.add_argument("--split", default="test", choices=("test", "calibration"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bounds", default="crown", choices=("ibp", "crown-ibp", "crown"))
    ap.add_argument("--eps", type=float, default=None, help="the working eps (default: from the calibration split)")
    ap.add_argument("--grid", type=lambda s: [float(v) for v in s.split(",")], default=None,
                    help="eps grid as fractions of the input range's width")
    ap.add_argument("--objectives", type=lambda s: s.split(","), default=list(OBJECTIVES))
    ap.add_argument("--set", action="append", default=[], help="key=value fine-tuning option for the two "
                                                              "certificate objectives; repeatable")
    ap.add_argument("--adaptive-limit", type=int, default=100)
    ap.add_argument("--adaptive-steps", type=int, default=100)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, nargs="*", default=None, help="JSON documents of earlier runs to plot")
    ap.add_argument("--png", type=Path, default=ROOT / "docs/results/detect-or-robust.png")
    ap.add_argument("--markdown", type=Path, nargs="*", default=None, help="JSON documents to print as tables")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.plot:
        plot(args.plot, args.png)
        return
    if args.markdown:
        print(markdown(args.markdown))
        return
    emit(measure(args), args.out)


if __name__ == "__main__":
    main()
