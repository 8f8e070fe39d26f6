"""Instrument, export, then evaluate through the ONNX graph on every pair; one row per pair, the worst pair marked.

    python -m bench.suite --method ctt-strict [--method nic ...] [--pairs cnn-digits,mlp-mnist] [--json]

Each ``--method`` is one run per pair (``a+b`` combines methods under ``--policy any``).  ``--set key=value``
passes an option to every method of the run that has it (``harden methods NAME`` lists them; the same as
``--method NAME:key=value``), which is how alternatives to a default are measured.  ``--split calibration`` measures
on the calibration split (where defaults are chosen); the default ``test`` split is only for reporting.

Per pair and method: test accuracy (and the original's), the alarm's false-positive rate on the whole test
split against the target, and per attack of each library the detection rate among successful adversarial
examples of originally correct inputs, with the ROC-AUC of the combined score; instrument seconds.
Adversarial examples of a classifier the method left unchanged are cached (cache/adv/), keyed by the weights;
bundles are cached in cache/bundles/, keyed by the pair's weights, the methods and every option (``--fresh``
instruments again; instrument seconds are those of the run that made the bundle).

``--adaptive`` adds, per pair, ``harden evaluate --adaptive`` at the pair's eps (L-inf) on the first
``--adaptive-limit`` inputs: the undefended classifier's success (lam 0), the key-known attacker's and the
key-unknown attacker's (fooled and no alarm in the exported graph).  ``--attacks ""`` skips the plain attacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.suite.attacks import ATTACK_NAMES, HARDEN_ONLY, KNOWN_ATTACKS, LIBRARIES, craft
from bench.suite.pairs import CACHE, PAIRS, LoadedPair, load_pair
from harden.attacks.strength import half_accuracy_eps
from harden.errors import HardenError
from harden.io.adversarial import AdversarialSet

SUITE_KEY = "harden-suite-key"
# The targets: ctt methods calibrate to 2%, every other method to 5%.
DEFAULT_FPR = {"ctt-lite": 0.02, "ctt-loose": 0.02, "ctt-strict": 0.02}
OTHER_FPR = 0.05


def build_options(method_label: str, sets: list[str], fpr: float | None, seed: int, key: str):
    """(method specs, shared Options) of one ``--method`` text: ``name[:k=v,...]``, several joined by ``+`` (a
    list option inside goes in brackets: ``safetynet:attacks=[fgsm:eps=auto+pgd:eps=auto]+nic``).  Each ``--set
    k=v`` goes to every method of the combination that has an option k (an error if none has)."""
    from harden.core.options import split_spec, split_top
    from harden.methods import load_all  # noqa: F401
    from harden.methods.base import METHODS, MethodSpec, Options

    texts = split_top(method_label, "+")
    parsed = [split_spec(text, "method") for text in texts]
    methods = [(METHODS.get(name), given) for name, given in parsed]
    for entry in sets:
        name, sep, value = entry.partition("=")
        if not sep:
            raise SystemExit(f"--set {entry!r} must be key=value")
        name = name.strip().replace("-", "_")
        takers = [given for cls, given in methods if any(p.name == name for p in cls.option_set.params())]
        if not takers:
            raise SystemExit(f"--set {name}: no method of {method_label!r} has that option")
        for given in takers:
            given[name] = value
    specs = [MethodSpec.of(cls.name, **given) for cls, given in methods]
    target = fpr if fpr is not None else min(DEFAULT_FPR.get(s.name, OTHER_FPR) for s in specs)
    return specs, Options(key=key, seed=seed, fpr=target)


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pair_eps(lp: LoadedPair) -> dict:
    """The pair's attack eps (FGSM halves the undefended accuracy on the calibration split), cached."""
    path = CACHE / f"{lp.pair.name}-{lp.pair.digest()}-eps.json"
    if path.exists():
        return json.loads(path.read_text())
    cal = lp.data.calibration
    strength = half_accuracy_eps(lp.model, cal.x[:500].numpy(), cal.y[:500].numpy(), input_range=lp.data.input_range,
                                 num_classes=lp.data.num_classes).to_json()
    path.write_text(json.dumps(strength, indent=1))
    return strength


def adversarial(model, library: str, attack: str, x, y, *, eps: float, lp: LoadedPair, split: str, seed: int):
    weights = _state_hash(model)
    tag = f"{lp.pair.name}-{split}-{len(x)}-{library}-{attack}-{eps:.6g}-{seed}-{weights}"
    path = CACHE / "adv" / (hashlib.sha256(tag.encode()).hexdigest()[:20] + ".npy")
    if path.exists():
        return np.load(path), True
    x_adv = craft(library, model, attack, x, y, eps=eps, input_range=lp.data.input_range,
                  num_classes=lp.data.num_classes, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x_adv)
    return x_adv, False


def _instrumented(lp: LoadedPair, names: list, options, args):
    """The bundle of this pair, methods and options, and the seconds instrument took: made once, then read
    from cache/bundles/ (``--fresh`` makes it again)."""
    from harden.api import instrument
    from harden.bundle.archive import load_bundle, save_bundle

    # every setting, defaults included: a changed default must not read a bundle made under the old one
    recipe = json.dumps({"methods": [[s.name, s.settings.to_dict()] for s in names], "options": vars(options),
                         "policy": args.policy}, sort_keys=True, default=str)
    tag = hashlib.sha256(f"{lp.pair.name}-{lp.pair.digest()}-{_state_hash(lp.model)}-{recipe}".encode()).hexdigest()[:20]
    path, seconds_path = CACHE / "bundles" / f"{tag}.hardened", CACHE / "bundles" / f"{tag}.json"
    if path.exists() and seconds_path.exists() and not args.fresh:
        return load_bundle(path)[0], json.loads(seconds_path.read_text())["instrument_seconds"]
    started = time.perf_counter()
    hardened = instrument(lp.model, lp.data, names, options, policy=args.policy)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(hardened, path)
    seconds_path.write_text(json.dumps({"instrument_seconds": seconds, "recipe": json.loads(recipe)}))
    return hardened, seconds


def run_one(lp: LoadedPair, method_label: str, args, say) -> dict:
    from harden.api import export_onnx
    from harden.evaluation.evaluate import evaluate
    from harden.export.runtime import OnnxGraph

    names, options = build_options(method_label, args.set, args.fpr, args.seed, args.key)
    strength = pair_eps(lp)
    eps = float(strength["eps"])
    hardened, instrument_s = _instrumented(lp, names, options, args)
    exported = export_onnx(hardened)
    graph = OnnxGraph(exported.model.SerializeToString())
    part = getattr(lp.data, args.split)
    x, y = part.x[: args.limit].numpy(), part.y[: args.limit].numpy()
    sets, crafted = [], {}
    for library in args.libraries:
        for attack in args.attacks:
            if library != "art" and attack in HARDEN_ONLY:
                continue
            t0 = time.perf_counter()
            x_adv, cached = adversarial(hardened.classifier, library, attack, x, y, eps=eps, lp=lp,
                                        split=args.split, seed=args.seed)
            crafted[f"{library}.{attack}"] = {"seconds": round(time.perf_counter() - t0, 1), "cached": cached}
            say(f"{lp.pair.name} {method_label}: {library}.{attack} ({'cached' if cached else 'crafted'})")
            sets.append(AdversarialSet(f"{library}.{attack}", x_adv, y, x_clean=x))
    report = evaluate(hardened.classifier, graph.run, x, y, [], input_range=lp.data.input_range,
                      num_classes=lp.data.num_classes, seed=args.seed, given=sets)
    adaptive = _adaptive(hardened, graph, x, y, eps, lp, args, say, method_label) if args.adaptive else None
    metrics = hardened.facts["metrics"]
    split_fpr = metrics["test_fpr"] if args.split == "test" else metrics["calibration_fpr"]
    detection = {r.attack: r.detection_rate_successful for r in report.rows}
    return {
        "pair": lp.pair.name, "method": method_label, "methods": [s.label() for s in names],
        "options": {k: v for k, v in vars(options).items() if k != "key"},
        "split": args.split, "n": len(x), "eps": eps,
        # On the calibration split (where defaults are chosen) accuracy is read there too, never on the test split.
        "accuracy": metrics["test_accuracy"] if args.split == "test" else report.clean_accuracy,
        "original_accuracy": (metrics["original_test_accuracy"] if args.split == "test"
                              else _accuracy(lp.model, x, y)),
        "fpr_target": options.fpr, "fpr": split_fpr, "fpr_evaluated": report.clean_fpr,
        "calibration_fpr": metrics["calibration_fpr"],
        "detection": detection,
        "successful": {r.attack: r.n_successful for r in report.rows},
        "auc": {r.attack: r.roc_auc.get("score") for r in report.rows},
        "instrument_seconds": round(instrument_s, 1),
        "parity": exported.parity.max_abs_diff,
        "attacks": crafted,
        "calibration": metrics.get("calibration"),
        **({"adaptive": adaptive} if adaptive is not None else {}),
    }


def _adaptive(hardened, graph, x, y, eps: float, lp: LoadedPair, args, say, method_label: str) -> dict:
    from harden.evaluation.adaptive import AdaptiveSettings
    from harden.evaluation.evaluate import evaluate_adaptive

    say(f"{lp.pair.name} {method_label}: adaptive attack at L-inf {eps:g}")
    started = time.perf_counter()
    report = evaluate_adaptive(hardened, graph.run, x[: args.adaptive_limit], y[: args.adaptive_limit],
                               AdaptiveSettings(eps=eps, steps=args.adaptive_steps), input_range=lp.data.input_range,
                               num_classes=lp.data.num_classes, reference=lp.data.train.x)
    unknown = report.get("key_unknown", {})
    return {"eps": eps, "n": report["n"], "n_correct": report["n_correct"], "steps": args.adaptive_steps,
            "undefended": report["type_i"]["fooled"], "plain_undetected": report["type_i"]["success"],
            "key_known": report["type_ii"]["success"], "key_unknown": unknown.get("success"),
            "key_unknown_note": unknown.get("skipped"), "seconds": round(time.perf_counter() - started, 1)}


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def worst(rows: list[dict]) -> dict:
    """Per column, the worst value and the pair it belongs to (lowest detection / accuracy / AUC, highest FPR
    excess and time)."""
    out: dict = {}

    def pick(column, value_of, lowest=True):
        values = [(value_of(r), r["pair"]) for r in rows if value_of(r) is not None]
        if values:
            v, pair = (min if lowest else max)(values)
            out[column] = {"value": v, "pair": pair}

    pick("accuracy_drop", lambda r: r["original_accuracy"] - r["accuracy"], lowest=False)
    pick("fpr_excess", lambda r: r["fpr"] - r["fpr_target"], lowest=False)
    pick("instrument_seconds", lambda r: r["instrument_seconds"], lowest=False)
    for attacker in ("key_known", "key_unknown"):   # the attacker's success: highest is worst
        pick(f"adaptive:{attacker}", lambda r, a=attacker: (r.get("adaptive") or {}).get(a), lowest=False)
    for attack in rows[0]["detection"] if rows else ():
        pick(f"detection:{attack}", lambda r, a=attack: r["detection"].get(a))
        pick(f"auc:{attack}", lambda r, a=attack: r["auc"].get(a))
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def render(method_label: str, rows: list[dict], worst_cols: dict):
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"{method_label} on the suite ({first['split']} split, {first['n']} inputs a pair; "
                        f"det = % of successful adversarial examples alarmed, ART/foolbox)")
    for column in ("pair", "eps", "acc (orig)", "FPR / target"):
        table.add_column(column, no_wrap=True)
    attacks = sorted({a.split(".", 1)[1] for a in first["detection"]}, key=KNOWN_ATTACKS.index)
    for attack in attacks:
        table.add_column(attack, justify="right", no_wrap=True)
    table.add_column("min AUC", justify="right")
    table.add_column("inst s", justify="right")
    adaptive = any("adaptive" in r for r in rows)
    if adaptive:
        table.add_column("adaptive undef/known/unknown", justify="right", no_wrap=True)

    def det(r, attack):
        return "/".join(_pct(r["detection"].get(f"{lib}.{attack}")) for lib in LIBRARIES
                        if f"{lib}.{attack}" in r["detection"])

    for r in rows:
        aucs = [v for v in r["auc"].values() if v is not None]
        table.add_row(r["pair"], f"{r['eps']:.3g}", f"{r['accuracy']:.3f} ({r['original_accuracy']:.3f})",
                      f"{100 * r['fpr']:.1f} / {100 * r['fpr_target']:.0f}", *[det(r, a) for a in attacks],
                      f"{min(aucs):.3f}" if aucs else "-", f"{r['instrument_seconds']:.0f}",
                      *([_adaptive_cell(r.get("adaptive"))] if adaptive else []))
    cells = []
    for attack in attacks:
        parts = [worst_cols.get(f"detection:{lib}.{attack}") for lib in LIBRARIES]
        cells.append("/".join(_pct(p["value"]) if p else "-" for p in parts if p is not None))
    fpr_w = worst_cols.get("fpr_excess")
    table.add_row("worst", "", f"{-worst_cols['accuracy_drop']['value']:+.3f}" if "accuracy_drop" in worst_cols else "",
                  f"{100 * fpr_w['value']:+.1f} ({fpr_w['pair']})" if fpr_w else "", *cells, "",
                  f"{worst_cols['instrument_seconds']['value']:.0f}" if "instrument_seconds" in worst_cols else "",
                  *(["/".join(["", *(_pct(worst_cols[f"adaptive:{k}"]["value"]) if f"adaptive:{k}" in worst_cols
                                          else "-" for k in ("key_known", "key_unknown"))])] if adaptive else []))
    return table


def _adaptive_cell(a: dict | None) -> str:
    if not a:
        return "-"
    return "/".join(_pct(a.get(k)) for k in ("undefended", "key_known", "key_unknown"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", action="append", required=True, help="a method, or a+b combined; repeatable")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated (default all: {', '.join(PAIRS)})")
    parser.add_argument("--split", default="test", choices=("test", "calibration"))
    parser.add_argument("--limit", type=int, default=200, help="inputs attacked per pair")
    parser.add_argument("--fpr", type=float, default=None, help="target FPR (default: 0.02 for CTT, else 0.05)")
    parser.add_argument("--set", action="append", default=[], help="key=value method option; repeatable")
    parser.add_argument("--policy", default="any")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key", default=SUITE_KEY)
    parser.add_argument("--fresh", action="store_true", help="instrument again instead of reading cache/bundles/")
    parser.add_argument("--adaptive", action="store_true", help="also run the adaptive attack per pair")
    parser.add_argument("--adaptive-limit", type=int, default=100)
    parser.add_argument("--adaptive-steps", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.libraries = [s for s in args.libraries.split(",") if s]
    args.attacks = [s for s in args.attacks.split(",") if s]
    if set(args.attacks) - set(KNOWN_ATTACKS):
        parser.error(f"unknown attack(s) {', '.join(sorted(set(args.attacks) - set(KNOWN_ATTACKS)))}; "
                     f"known: {', '.join(KNOWN_ATTACKS)}")
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; pairs: {', '.join(PAIRS)}")

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    results = {"methods": {}, "set": args.set, "split": args.split, "limit": args.limit}
    loaded = {name: load_pair(name) for name in pairs}
    for method_label in args.method:
        rows, failed = [], {}
        for name in pairs:
            try:
                rows.append(run_one(loaded[name], method_label, args, say))
            except HardenError as exc:  # one pair's failure is a finding to report, not the end of the run
                failed[name] = str(exc)
                say(f"{name} {method_label}: FAILED: {exc}")
        results["methods"][method_label] = {"rows": rows, "worst": worst(rows), "failed": failed}
        if not args.json:
            from rich.console import Console

            if rows:
                Console(width=200).print(render(method_label, rows, results["methods"][method_label]["worst"]))
            for name, error in failed.items():
                print(f"{method_label} on {name} FAILED: {error}")
    text = json.dumps(results, indent=1, default=float)
    if args.out:
        args.out.write_text(text)
    if args.json:
        print(text)
    return 0
