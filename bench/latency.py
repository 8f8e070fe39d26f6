"""onnxruntime latency of the hardened graph against the plain exported classifier, side by side.

    python bench/latency.py --json [--method ctt-lite] [--method safetynet ...] [--checkpoint PATH]

Both graphs are timed in the same process, interleaved round by round, so
machine noise hits both alike; the ratio is hardened / plain median latency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harden.examples.lenet import LeNet5  # noqa: E402
from bench.suite.run import build_options  # noqa: E402
from harden.export import export_onnx  # noqa: E402
from harden.export.latency import compare_latency, plain_graph  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.instrumentation.pipeline import instrument  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.methods.base import Options  # noqa: E402
from harden.export.runtime import OnnxGraph  # noqa: E402


def load_lenet(checkpoint: Path | None) -> torch.nn.Module:
    model = LeNet5()
    if checkpoint and checkpoint.is_file():
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", action="append", default=None)
    parser.add_argument("--checkpoint", type=Path, default=Path("out/lenet5_mnist.pt"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option (as bench.suite's --set), e.g. ramp=0; repeatable")
    args = parser.parse_args()
    methods = args.method or ["ctt-lite"]
    torch.set_num_threads(args.threads)

    data = load_data("mnist", seed=0, limit=args.limit)
    model = load_lenet(args.checkpoint)
    specs, options = build_options("+".join(methods), args.set, Options().fpr, 0, "bench")
    hardened = instrument(model, data, specs, options)
    hardened_graph = OnnxGraph(export_onnx(hardened).model.SerializeToString(), threads=args.threads)
    plain = plain_graph(trace(model), data.test.x[:2], threads=args.threads)

    timing = compare_latency(plain, hardened_graph, data.test.x.numpy(), rounds=args.rounds)
    result = {"methods": [s.label() for s in specs], "model": "LeNet5", "threads": args.threads, "rounds": args.rounds,
              "batches": {batch: {k: v for k, v in row.items() if k != "rounds"}
                          for batch, row in timing["batches"].items()},
              "ratio": timing["ratio"]}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
