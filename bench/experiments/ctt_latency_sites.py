"""ctt-lite latency ratio (batch 256, 1 thread) by which sites carry traps: where the overhead comes from.

    OMP_NUM_THREADS=1 python bench/experiments/ctt_latency_sites.py
"""
import sys, numpy as np, torch
sys.path.insert(0, '.')
torch.set_num_threads(1)
from pathlib import Path
from bench.latency import load_lenet, time_pair
from harden.export import export_onnx
from harden.export.torch_graph import export_module
from harden.graph.trace import trace
from harden.instrumentation.pipeline import instrument
from harden.io.data import load_data
from harden.methods.base import Options
from harden.export.runtime import OnnxGraph
data = load_data("mnist", seed=0, limit=2000)
model = load_lenet(Path("out/lenet5_mnist.pt"))
plain = OnnxGraph(export_module(trace(model), (data.test.x[:2],), ["input"], ["logits"]).SerializeToString(), threads=1)
x = np.ascontiguousarray(np.resize(data.test.x.numpy(), (256, 1, 28, 28)), dtype=np.float32)
for layers in (["all"], ["relu1,relu3,relu4"], ["relu3,relu4"], ["relu2,relu3,relu4"]):
    h = instrument(model, data, ["ctt-lite"], Options(key="bench", layers=layers))
    g = OnnxGraph(export_onnx(h).model.SerializeToString(), threads=1)
    rs = []
    for _ in range(3):
        p, q = time_pair(plain, g, x, 100)
        rs.append(q / p)
    print(layers, [round(r, 3) for r in rs], flush=True)
