"""docs/BENCHMARKS.md "Why ctt-lite misses 1.05": ctt-lite's latency ratio (batch 256, 1 thread) by which sites carry traps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.experiments.example import load_lenet  # noqa: E402

SITE_SETS = ("all", "[relu1,relu3,relu4]", "[relu3,relu4]", "[relu2,relu3,relu4]")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per site set")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds per run")
    parser.add_argument("--layers", action="append", default=None, help="site sets (default: the four of the page)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from bench.latency import time_pair
    from harden.export import export_onnx
    from harden.export.runtime import OnnxGraph
    from harden.export.torch_graph import export_module
    from harden.graph.trace import trace
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options

    data = load_data("mnist", seed=0, limit=2000)
    model = load_lenet(args.checkpoint)
    plain = OnnxGraph(export_module(trace(model), (data.test.x[:2],), ["input"], ["logits"]).SerializeToString(),
                      threads=1)
    x = np.ascontiguousarray(np.resize(data.test.x.numpy(), (256, *data.test.x.shape[1:])), dtype=np.float32)
    for layers in args.layers or SITE_SETS:
        hardened = instrument(model, data, [f"ctt-lite:layers={layers}"], Options(key="bench"))
        graph = OnnxGraph(export_onnx(hardened).model.SerializeToString(), threads=1)
        ratios = []
        for _ in range(args.runs):
            p, q = time_pair(plain, graph, x, args.rounds)
            ratios.append(round(q / p, 3))
        print(json.dumps({"layers": layers, "ratios": ratios}), flush=True)


if __name__ == "__main__":
    main()
