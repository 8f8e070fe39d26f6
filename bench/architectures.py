"""A ResNet-18-class model at 32x32x3 through every stage, against the targets of docs/results/architectures.md.

    python bench/architectures.py --part instrument --json    # instrument ctt-lite, export (seconds; < 60 s each)
    python bench/architectures.py --part certify --json       # certify --bounds crown (seconds per image; < 5 s)
    python bench/architectures.py --part latency --json       # onnxruntime hardened / plain at batch 64, per method
    python bench/architectures.py --part parity --json        # export parity figures per method
    python bench/architectures.py --part matrix --family vit --form pt2 --json   # one zoo family, every stage

The model is the suite's ``resnet18-shapes`` pair (torchvision's ResNet-18 at full width, built by tests/zoo.py,
trained on the suite's 32x32 shapes; cached under bench/suite/cache/).  Latency: the plain exported classifier
and the hardened graph run in one process, interleaved round by round, so machine noise hits both alike; the
ratio is hardened / plain median latency, and the figure the median of ``--repeats`` such ratios, each with fresh
sessions (targets: ctt-lite <= 1.02, nic and safetynet <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite.pairs import PAIRS, Pair, load_pair  # noqa: E402
from bench.suite.run import SUITE_KEY, build_options  # noqa: E402
from harden.export import export_onnx  # noqa: E402
from harden.export.runtime import OnnxGraph  # noqa: E402
from harden.export.latency import time_pair  # noqa: E402
from harden.export.torch_graph import export_module  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402

TARGETS = {"instrument_s": 60.0, "export_s": 60.0, "crown_s_per_image": 5.0,
           "latency_ratio": {"ctt-lite": 1.02, "nic": 1.10, "safetynet": 1.10}}


def zoo_pair(family: str, epochs: int) -> Pair:
    """A family of tests/zoo.py at full size on the resnet18-shapes pair's data and recipe (fewer epochs)."""
    return replace(PAIRS["resnet18-shapes"], name=f"zoo-{family}-shapes", arch=f"zoo:{family}", epochs=epochs)


def _hardened(lp, method: str, sets: list[str]):
    names, options = build_options(method, sets, None, 0, SUITE_KEY)
    started = time.perf_counter()
    hardened = instrument(lp.model, lp.data, names, options)
    return hardened, time.perf_counter() - started


def part_instrument(lp, args) -> dict:
    hardened, seconds = _hardened(lp, "ctt-lite", args.set)
    started = time.perf_counter()
    result = export_onnx(hardened)
    exported = time.perf_counter() - started
    return {"method": "ctt-lite", "instrument_s": round(seconds, 2), "export_s": round(exported, 2),
            "sites": len(hardened.methods[0].sites), "parity": result.parity.to_json()}


def part_certify(lp, args) -> dict:
    from harden.certification.certify import certify_samples

    hardened, _ = _hardened(lp, "ctt-lite", args.set)
    traps = _traps(hardened)
    x, y = lp.data.test.x[:args.images], lp.data.test.y[:args.images]
    rows = {}
    for bounds in args.bounds:
        certify_samples(hardened.classifier, traps, x[:1], y[:1], args.eps, lp.data.input_range, bounds=bounds)
        started = time.perf_counter()
        out = certify_samples(hardened.classifier, traps, x, y, args.eps, lp.data.input_range, bounds=bounds)
        seconds = time.perf_counter() - started
        rows[bounds] = {"s_per_image": round(seconds / len(x), 3), "robust": float(out["robust"].float().mean()),
                        "detect_or_robust": float(out["detect_or_robust"].float().mean()),
                        "interval_only": sorted(out.get("interval_only", []))}
    return {"eps": args.eps, "images": len(x), "threads": torch.get_num_threads(), "bounds": rows}


def _traps(hardened):
    from harden.api import ctt_traps

    return ctt_traps(hardened)


def part_latency(lp, args) -> dict:
    """Per method: ``--repeats`` measurements, each with fresh onnxruntime sessions of both graphs, plain and
    hardened interleaved round by round; the ratio reported is the median of the repeats' ratios.  One pair of
    sessions can sit a few percent off another pair on the same graphs (measured: ratios 1.00-1.05 for one
    graph), more than the trap head costs, so one measurement is not a figure."""
    import statistics

    x_all = lp.data.test.x.numpy()
    x = np.ascontiguousarray(np.resize(x_all, (args.batch, *x_all.shape[1:])), dtype=np.float32)
    plain_bytes = export_module(trace(lp.model), (lp.data.test.x[:2],), ["input"], ["logits"]).SerializeToString()
    rows = {}
    for method in args.method:
        hardened, _ = _hardened(lp, method, args.set)
        hardened_bytes = export_onnx(hardened).model.SerializeToString()
        runs = []
        for _ in range(args.repeats):
            plain = OnnxGraph(plain_bytes, threads=args.threads)
            graph = OnnxGraph(hardened_bytes, threads=args.threads)
            runs.append(time_pair(plain, graph, x, args.rounds))
        ratios = [h / p for p, h in runs]
        rows[method] = {"plain_ms": round(statistics.median(p for p, _ in runs) * 1e3, 3),
                        "hardened_ms": round(statistics.median(h for _, h in runs) * 1e3, 3),
                        "ratio": round(statistics.median(ratios), 4), "ratios": [round(r, 4) for r in ratios],
                        "target": TARGETS["latency_ratio"].get(method.split("+")[0])}
    return {"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "methods": rows}


def part_parity(lp, args) -> dict:
    rows = {}
    for method in args.method:
        hardened, _ = _hardened(lp, method, args.set)
        try:
            rows[method] = export_onnx(hardened).parity.to_json()
        except Exception as exc:  # noqa: BLE001 - a failed parity is a figure here
            rows[method] = {"error": str(exc)}
    return {"methods": rows}


def part_matrix(_lp, args) -> dict:
    """One family of tests/zoo.py (tiny widths, trained on the digits' train split) as the user would bring it
    (state_dict + --arch, or .pt2), through layers, every method, export parity, certify and evaluate."""
    import tempfile

    import harden
    from harden.api import ctt_traps
    from harden.certification.certify import check_certificates, certify_samples
    from harden.graph.ops import canonical_op
    from harden.graph.trace import sites
    from harden.io.data import load_data
    from tests import zoo
    from tests.conftest import TinyCNN, train_tiny

    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = train_tiny(zoo.build(args.family), data.train.x, data.train.y, epochs=args.epochs, lr=args.lr)
    torch.manual_seed(1)
    second = train_tiny(TinyCNN(), data.train.x, data.train.y, epochs=30)
    folder = Path(tempfile.mkdtemp())
    torch.save(second.state_dict(), folder / "second.pt")
    if args.form == "pt2":
        path, arch = folder / "model.pt2", None
        program = torch.export.export(model, (data.train.x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(path))
    else:
        path, arch = folder / "model.pt", f"tests.zoo:{args.family}_tiny"
        torch.save(model.state_dict(), path)
    loaded = harden.load_model(path, arch=arch)
    with torch.no_grad():
        accuracy = float((loaded(data.test.x).argmax(1) == data.test.y).float().mean())
    from harden.graph.trace import trace

    gm = trace(loaded)
    row = {"family": args.family, "form": args.form, "test_accuracy": round(accuracy, 4),
           "sites": len(sites(gm)), "site_ops": sorted({canonical_op(gm, n) for n in sites(gm)}), "methods": {}}
    for method in args.method:
        given = [f"second_model={folder / 'second.pt'}", "second_arch=tests.conftest:TinyCNN"] \
            if method == "mismatch" else []
        if method == "ctt-strict":
            given.append(f"steps={args.steps}")
        (spec,), options = build_options(method, given + args.set, 0.05, 0, SUITE_KEY)
        started = time.perf_counter()
        entry: dict = {}
        try:
            hardened = harden.instrument(loaded, data, [spec], options)
            entry["instrument_s"] = round(time.perf_counter() - started, 1)
            onnx_path = folder / f"{method}.onnx"
            exported = harden.export_onnx(hardened, onnx_path)
            entry["parity_share_of_tolerance"] = round(exported.parity.worst_ratio(), 3)
            entry["test_fpr"] = hardened.facts["metrics"]["test_fpr"]
            config = hardened.methods[0].config
            if "svm" in config:   # SafetyNet: the SVM's size, which its budgets bound
                entry["svm"] = {"features": config.get("features"), "sites": len(config.get("sites", [])),
                                "support_vectors": config["svm"]["support_vectors"],
                                "before_budget": config["svm"].get("support_vectors_before_budget")}
            manifest = harden.save_bundle(hardened, folder / f"{method}.hardened")
            evaluated = harden.evaluate(hardened, manifest, args.attack, onnx_path=onnx_path, limit=args.limit)
            entry["detection"] = {r.attack: r.detection_rate_successful for r in evaluated.rows}
            if method.startswith("ctt"):
                traps = ctt_traps(hardened)
                x, y = data.test.x[:args.images], data.test.y[:args.images]
                for bounds in ("ibp", "crown"):
                    cert = certify_samples(hardened.classifier, traps, x, y, args.eps, data.input_range, bounds=bounds)
                    check = check_certificates(hardened.classifier, traps, x, y, args.eps, data.input_range, 20, 0,
                                               bounds=bounds)
                    entry[f"certify_{bounds}"] = {"robust": float(cert["robust"].float().mean()),
                                                  "detect_or_robust": float(cert["detect_or_robust"].float().mean()),
                                                  "violations": check.violations}
        except Exception as exc:  # noqa: BLE001 - a stage that fails is the row's finding
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        entry["seconds"] = round(time.perf_counter() - started, 1)
        row["methods"][method] = entry
    return row


PARTS = {"instrument": part_instrument, "certify": part_certify, "latency": part_latency, "parity": part_parity,
         "matrix": part_matrix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--pair", default="resnet18-shapes",
                        help="a suite pair, or zoo:FAMILY (tests/zoo.py at full size on the suite's 32x32 shapes, "
                             "trained --pair-epochs epochs; cached like a pair)")
    parser.add_argument("--pair-epochs", type=int, default=2, help="zoo:FAMILY: training epochs")
    parser.add_argument("--method", action="append", default=None, help="latency/parity: repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    parser.add_argument("--images", type=int, default=10, help="certify: test images")
    parser.add_argument("--eps", type=float, default=1 / 255, help="certify: L-inf radius")
    parser.add_argument("--bounds", action="append", default=None, help="certify: ibp | crown-ibp | crown")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="latency: fresh session pairs per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", default="resnet18", help="matrix: a family of tests/zoo.py")
    parser.add_argument("--form", choices=["state_dict", "pt2"], default="state_dict", help="matrix")
    parser.add_argument("--epochs", type=int, default=30, help="matrix: training epochs")
    parser.add_argument("--lr", type=float, default=1e-2, help="matrix: training learning rate")
    parser.add_argument("--steps", type=int, default=200, help="matrix: ctt-strict step budget")
    parser.add_argument("--attack", action="append", default=None, help="matrix: attacks to evaluate")
    parser.add_argument("--limit", type=int, default=200, help="matrix: test inputs attacked")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.method = args.method or (["ctt-lite", "ctt-strict", "safetynet", "nic", "mismatch"] if args.part == "matrix"
                                  else ["ctt-lite", "nic", "safetynet"])
    args.attack = args.attack or ["fgsm:eps=0.1", "pgd:eps=0.1"]
    args.bounds = args.bounds or ["ibp", "crown"]
    if args.part == "matrix" and args.eps == 1 / 255:
        args.eps = 0.01
    torch.set_num_threads(args.threads)
    if args.part == "matrix":
        result = {"part": "matrix", **part_matrix(None, args)}
    else:
        lp = load_pair(zoo_pair(args.pair[4:], args.pair_epochs) if args.pair.startswith("zoo:") else args.pair)
        result = {"pair": args.pair, "part": args.part, "targets": TARGETS, "model": lp.facts,
                  **PARTS[args.part](lp, args)}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
