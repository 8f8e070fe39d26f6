"""docs/results/safetynet.md and docs/BENCHMARKS.md: SafetyNet's SVM as dense ONNX algebra vs skl2onnx's SVMClassifier, beside LeNet-5."""

#     # a hardened graph end to end, against the plain classifier exported from the same checkpoint
#     python bench/experiments/safetynet_latency.py --onnx lenet.onnx --checkpoint lenet.pt [--threads 2]
#     # the SVM alone, by number of support vectors: skl2onnx's SVMClassifier vs SafetyNet's MatMul graph
#     # (on raw quaternary codes, exact integer product; and after a StandardScaler, all float64)
#     python bench/experiments/safetynet_latency.py --sizes 200,400,800 [--dim 84]
#
# Both graphs are timed interleaved, round by round, at batch 256 (and 1). Besides wall time (as bench/latency.py)
# it records the process CPU time of each call: with one intra-op thread that is the work done, which stays
# meaningful on a shared, saturated machine where wall time mostly measures the neighbours.

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.examples.lenet import LeNet5  # noqa: E402
from harden.detectors.sklearn_onnx import SklearnDetector  # noqa: E402
from harden.export.torch_graph import export_module  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.methods.safetynet import RbfSvmDetector  # noqa: E402
from harden.export.runtime import OnnxGraph  # noqa: E402
from bench.experiments.example import load_lenet


def timed(runs, rounds: int) -> list[dict]:
    """Median wall and CPU milliseconds per call of each (graph, feed), interleaved."""
    for g, feed in runs:
        for _ in range(3):
            g.session.run(None, feed)
    wall, cpu = [[] for _ in runs], [[] for _ in runs]
    for _ in range(rounds):
        for i, (g, feed) in enumerate(runs):
            w0, c0 = time.perf_counter(), time.process_time()
            g.session.run(None, feed)
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return [{"wall_ms": round(statistics.median(w) * 1e3, 3), "cpu_ms": round(statistics.median(c) * 1e3, 3)}
            for w, c in zip(wall, cpu)]


def end_to_end(args) -> None:
    model = load_lenet(args.checkpoint)
    x_all = torch.rand(256, 1, 28, 28)
    plain = OnnxGraph(export_module(trace(model), (x_all[:2],), ["input"], ["logits"]).SerializeToString(),
                      threads=args.threads)
    hardened = OnnxGraph(args.onnx, threads=args.threads)
    result = {"onnx": str(args.onnx), "threads": args.threads, "batches": {}}
    for batch in (1, 256):
        x = x_all[:batch].numpy()
        rounds = args.rounds if batch == 256 else args.rounds * 4
        p, h = timed([(plain, {plain.input_name: x}), (hardened, {hardened.input_name: x})], rounds)
        result["batches"][str(batch)] = {"plain": p, "hardened": h, "ratio_wall": round(h["wall_ms"] / p["wall_ms"], 3),
                                         "ratio_cpu": round(h["cpu_ms"] / p["cpu_ms"], 3) if p["cpu_ms"] else None}
    print(json.dumps(result), flush=True)


def by_size(args) -> None:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    model = LeNet5().eval()
    x = torch.rand(256, 1, 28, 28)
    plain = OnnxGraph(export_module(trace(model), (x[:2],), ["input"], ["logits"]).SerializeToString(), threads=args.threads)
    rng = np.random.default_rng(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        codes = rng.integers(0, 4, (n, args.dim)).astype(np.float32)
        labels = rng.integers(0, 2, n)  # random labels: nearly every example becomes a support vector
        scaled = make_pipeline(StandardScaler(), SVC(C=10.0, gamma=1.0 / args.dim)).fit(codes, labels)
        plain_svc = SVC(C=10.0, gamma=0.2 / args.dim).fit(codes, labels)
        dets = {"svmclassifier": (SklearnDetector(plain_svc, "m", args.dim, column=1), plain_svc),
                "matmul_scaled_float64": (RbfSvmDetector(scaled, "m", args.dim), scaled),
                "matmul_codes_exact": (RbfSvmDetector(plain_svc, "m", args.dim), plain_svc)}
        graphs = {k: OnnxGraph(d.onnx_model(), threads=args.threads) for k, (d, _) in dets.items()}
        feats = rng.integers(0, 4, (256, args.dim)).astype(np.float32)
        times = timed([(plain, {plain.input_name: x.numpy()})] + [(g, {g.input_name: feats}) for g in graphs.values()],
                      args.rounds)
        row = {"support_vectors": int(plain_svc.n_support_.sum()), "dim": args.dim, "threads": args.threads,
               "plain": times[0]}
        for (name, g), t in zip(graphs.items(), times[1:]):
            err = float(np.abs(g.run(feats)["m.raw"] - dets[name][1].decision_function(feats)).max())
            row[name] = {**t, "cpu_ratio": round((times[0]["cpu_ms"] + t["cpu_ms"]) / times[0]["cpu_ms"], 3),
                         "max_abs_err": err}
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--onnx", type=Path)
    p.add_argument("--checkpoint", type=Path, default=Path("out/lenet5_mnist.pt"))
    p.add_argument("--sizes", default="100,200,400,800")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    if args.onnx:
        end_to_end(args)
    else:
        by_size(args)


if __name__ == "__main__":
    main()
