"""Where the exported NIC graph spends its time: onnxruntime's profiler at batch 256, summed per node.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.experiments.nic_profile --set '{}' --top 25

Instruments LeNet-5 / MNIST as ``bench/latency.py --method nic`` does (key "bench", 2,000 digits), exports it,
runs ``--runs`` batches of 256 with ``SessionOptions.enable_profiling`` (one thread), and prints per node the mean
microseconds per run (the median over runs, robust to a shared machine's preemption), the op type, and the
total; the plain exported classifier is profiled alike for reference.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import torch
from bench.experiments.example import load_lenet


def profile(model_bytes: bytes, x: np.ndarray, runs: int) -> tuple[dict, dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "nic")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(runs):
            session.run(None, feed)
        path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
    samples = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            samples[(e["name"][: -len("_kernel_time")], e["args"].get("op_name", ""))].append(e["dur"])
    per_node, per_op = collections.Counter(), collections.Counter()
    for (name, op), durations in samples.items():
        per_node[(name, op)] = float(np.median(durations)) * len(durations) / runs
        per_op[op] += per_node[(name, op)]
    return per_node, per_op


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="{}", help="JSON object of NIC options")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from harden.export import export_onnx
    from harden.export.torch_graph import export_module
    from harden.graph.trace import trace
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options

    data = load_data("mnist", seed=0, limit=args.limit)
    model = load_lenet("out/lenet5_mnist.pt")
    hardened = instrument(model, data, ["nic"], Options(key="bench", extra=json.loads(args.set)))
    graph = export_onnx(hardened).model.SerializeToString()
    plain = export_module(trace(model), (data.test.x[:2],), ["input"], ["logits"]).SerializeToString()
    x = np.ascontiguousarray(np.resize(data.test.x.numpy(), (256, 1, 28, 28)), dtype=np.float32)
    for label, blob in (("plain", plain), ("hardened", graph)):
        per_node, per_op = profile(blob, x, args.runs)
        print(json.dumps({"graph": label, "total_us": round(sum(per_node.values()), 1), "nodes": len(per_node),
                          "per_op": {k: round(v, 1) for k, v in per_op.most_common()}}))
        if label == "hardened":
            for (name, op), us in per_node.most_common(args.top):
                print(f"{us:9.1f} us  {op:14s} {name}")


if __name__ == "__main__":
    main()
