"""NIC's cost for a grid of settings: support vectors, export parity, and hardened/plain onnxruntime latency.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.experiments.nic_latency --set '{"nic_nu": 0.02}' --set '{}'

Each ``--set`` (JSON options, as ``Options.extra``) is instrumented on LeNet-5 / MNIST exactly as
``bench/latency.py --method nic`` does (key "bench", ``--limit`` digits), exported with the parity check, and timed
beside the plain exported classifier with ``bench/latency.py``'s paired, interleaved medians.  One JSON line per
setting: support vectors per one-class SVM, parity, batch-1 and batch-256 latency and ratio.  Detection for the same
settings comes from ``bench/experiments/nic_select.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _latency_module():
    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "bench" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def support_vectors(estimator) -> int:
    svm = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return int(svm.support_vectors_.shape[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=None, help="JSON object of NIC options; repeatable")
    parser.add_argument("--limit", type=int, default=2000, help="digits of the bundled MNIST (bench/latency.py's)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--key", default="bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    from harden.errors import HardenError
    from harden.export import export_onnx
    from harden.export.torch_graph import export_module
    from harden.graph.trace import trace
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options
    from harden.export.runtime import OnnxGraph

    latency = _latency_module()
    data = load_data("mnist", seed=0, limit=args.limit)
    model = latency.load_lenet(ROOT / "examples" / "lenet5_mnist.pt")
    plain = OnnxGraph(export_module(trace(model), (data.test.x[:2],), ["input"], ["logits"]).SerializeToString(),
                      threads=args.threads)
    x_all = data.test.x.numpy()
    for text in args.set or ["{}"]:
        extra = json.loads(text)
        hardened = instrument(model, data, ["nic"], Options(key=args.key, extra=extra))
        method = hardened.method("nic")
        row = {"extra": extra, "support_vectors": [[support_vectors(p.estimator) for p in s.parts] + [support_vectors(s.final)]
                                                   for s in method.detector.sets]}
        try:
            result = export_onnx(hardened)
        except HardenError as exc:
            row["parity"] = str(exc)
            print(json.dumps(row), flush=True)
            continue
        row["parity"] = result.parity.max_abs_diff.get("nic.score")
        graph = OnnxGraph(result.model.SerializeToString(), threads=args.threads)
        for batch in (1, 256):
            x = np.ascontiguousarray(np.resize(x_all, (batch, *x_all.shape[1:])), dtype=np.float32)
            p, h = latency.time_pair(plain, graph, x, args.rounds if batch == 1 else max(20, args.rounds // 4))
            row[f"batch{batch}"] = {"plain_ms": round(p * 1e3, 3), "hardened_ms": round(h * 1e3, 3), "ratio": round(h / p, 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
