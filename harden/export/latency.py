"""onnxruntime latency of a hardened graph against the plain classifier's, measured side by side.

Both graphs run in the same process, interleaved call by call, so machine noise hits both alike; the
ratio is hardened / plain median latency.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from harden.errors import HardenError
from harden.export.runtime import OnnxGraph
from harden.export.torch_graph import export_module

BATCHES = (1, 256)
ROUNDS = 100          # timed calls at batch 1; larger batches take a quarter, at least MIN_ROUNDS
MIN_ROUNDS = 20
WARMUP = 5


def plain_graph(classifier: torch.nn.Module, example: torch.Tensor, threads: int | None = None) -> OnnxGraph:
    """The classifier alone (``input`` -> ``logits``), exported the way harden exports the hardened graph."""
    proto = export_module(classifier, (example,), ["input"], ["logits"])
    return OnnxGraph(proto.SerializeToString(), threads=threads)


def time_pair(plain: OnnxGraph, hardened: OnnxGraph, x: np.ndarray, rounds: int) -> tuple[float, float]:
    """Median seconds per call of each graph on ``x``, measured alternately after a warm-up."""
    feed_p = {plain.input_name: x}
    feed_h = {hardened.input_name: x}
    for _ in range(WARMUP):
        plain.session.run(None, feed_p)
        hardened.session.run(None, feed_h)
    tp, th = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain.session.run(None, feed_p)
        t1 = time.perf_counter()
        hardened.session.run(None, feed_h)
        t2 = time.perf_counter()
        tp.append(t1 - t0)
        th.append(t2 - t1)
    return statistics.median(tp), statistics.median(th)


def compare_latency(plain: OnnxGraph, hardened: OnnxGraph, inputs: np.ndarray, *, batches=BATCHES,
                    rounds: int = ROUNDS, progress: Callable[[str, float], None] = lambda m, f: None) -> dict:
    """Per batch size: median ms of the plain and the hardened graph and their ratio.  ``inputs`` (real data,
    repeated to fill a batch) feed both.  ``ratio`` is the largest batch's."""
    if rounds < 1:
        raise HardenError(f"latency rounds must be >= 1; got {rounds}")
    if len(inputs) == 0:
        raise HardenError("latency needs at least one input")
    result = {"rounds": rounds, "batches": {}}
    for i, batch in enumerate(batches):
        progress(f"batch {batch}: plain and hardened graphs, interleaved", i / len(batches))
        x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])), dtype=np.float32)
        n = rounds if batch == 1 else max(MIN_ROUNDS, rounds // 4)
        plain_s, hardened_s = time_pair(plain, hardened, x, n)
        result["batches"][str(batch)] = {
            "rounds": n,
            "plain_ms": round(plain_s * 1e3, 4),
            "hardened_ms": round(hardened_s * 1e3, 4),
            "ratio": round(hardened_s / plain_s, 4),
        }
    result["ratio"] = result["batches"][str(batches[-1])]["ratio"]
    return result
