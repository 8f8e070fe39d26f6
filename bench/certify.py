"""Interval bound propagation throughput beside the plain forward pass, on LeNet-5 at batch 256;
then milliseconds per image of each bound method (ibp, crown-ibp, crown) on the example LeNet-5 / MNIST
(after one warm-up batch per method, timed apart).

    python bench/certify.py --json
    python bench/certify.py --json --only-methods --method-samples 200

Both passes run in the same process in paired rounds (one forward, then one
propagation, back to back); the ratio (target >= 1/3) is the median over rounds
of the paired ratios, so a busy machine slows both sides of a pair alike.
Throughputs are medians (best-of-rounds beside them).  certify_samples (plain
and trap-clamped propagation plus the folded margin) is timed on the same batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harden.bounds import Interval, propagate  # noqa: E402
from harden.certification.certify import Trap, certify_samples  # noqa: E402
from harden.graph.trace import trace  # noqa: E402


def lenet() -> nn.Module:
    try:
        from harden.examples.lenet import LeNet5

        return LeNet5()
    except ImportError:  # the example is optional: the same architecture, built here
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )


def timed(fn, repeats: int, faults: list[int] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        before = _minor_faults()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if faults is not None:
            faults.append(_minor_faults() - before)
    return times


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on every platform
        return 0


def example_lenet(checkpoint: Path):
    """The example checkpoint and the MNIST test split (the figures of issue 8), or None when absent."""
    try:
        from harden.io.data import load_data
        from harden.io.model import load_model

        model = load_model(checkpoint, arch="harden.examples.lenet:LeNet5").eval()
        test = load_data("mnist").test
    except Exception as exc:  # no checkpoint or no data: say so, time nothing
        return None, f"{type(exc).__name__}: {exc}"
    return (trace(model), test), None


def bound_methods(args) -> dict:
    """ms per image and robust count of each bound method, one process, methods interleaved per round."""
    from harden.bounds.crown import METHODS

    loaded, why = example_lenet(args.checkpoint)
    if loaded is None:
        return {"skipped": why}
    gm, test = loaded
    torch.set_num_threads(args.method_threads)
    x, y = test.x[: args.method_samples], test.y[: args.method_samples]
    times = {m: [] for m in METHODS}
    cpu = {m: [] for m in METHODS}
    robust = {}
    warmup = {}
    for method in METHODS:
        # one batch first, timed apart: one-time costs (oneDNN kernels built per shape, first-touch pages,
        # window matrices) would otherwise be charged to the per-image figure of a 200-image run
        start_cpu = time.process_time()
        certify_samples(gm, [], x[: args.method_batch], y[: args.method_batch], args.method_eps, (0.0, 1.0),
                        batch_size=args.method_batch, bounds=method)
        warmup[method] = round(1000 * (time.process_time() - start_cpu) / min(args.method_batch, x.shape[0]), 2)
    for _ in range(args.method_rounds):
        for method in METHODS:
            start, start_cpu = time.perf_counter(), time.process_time()
            r = certify_samples(gm, [], x, y, args.method_eps, (0.0, 1.0), batch_size=args.method_batch,
                                bounds=method)
            times[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)
            robust[method] = int(r["robust"].sum())
    n = x.shape[0]
    return {
        "model": "out/lenet5_mnist.pt (LeNet-5), MNIST test split",
        "samples": n, "eps": args.method_eps, "batch": args.method_batch, "threads": torch.get_num_threads(),
        "rounds": args.method_rounds,
        "ms_per_image": {m: round(1000 * statistics.median(t) / n, 2) for m, t in times.items()},
        # CPU time of this process: on a shared machine closer to what a quiet one gives than wall time
        "cpu_ms_per_image": {m: round(1000 * statistics.median(t) / n, 2) for m, t in cpu.items()},
        # the warm-up batch alone (cold process): CPU ms per image
        "warmup_cpu_ms_per_image": warmup,
        "robust": robust,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eps", type=float, default=0.003)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only-methods", action="store_true", help="time only the bound methods")
    parser.add_argument("--method-samples", type=int, default=50)
    parser.add_argument("--method-batch", type=int, default=50)
    parser.add_argument("--method-eps", type=float, default=0.01)
    parser.add_argument("--checkpoint", type=Path, default=Path("out/lenet5_mnist.pt"),
                        help="the example LeNet-5 (python -m harden.examples.train_lenet --out out/lenet5_mnist.pt)")
    parser.add_argument("--method-rounds", type=int, default=1)
    parser.add_argument("--method-threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.only_methods:
        result = {"bound_methods": bound_methods(args), "torch": torch.__version__}
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return result

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gm = trace(lenet().eval())
    x = torch.rand(args.batch, 1, 28, 28)
    with torch.no_grad():
        y = gm(x).argmax(1)
    sites = [n.name for n in gm.graph.nodes if "relu" in n.name]
    generator = torch.Generator().manual_seed(1)
    traps = []
    with torch.no_grad():
        values = {}
        from harden.bounds import run_recorded

        _, values = run_recorded(gm, x, sites)
    for site in sites:
        size = values[site][0].numel()
        idx = torch.randperm(size, generator=generator)[: max(1, size // 20)].sort().values
        traps.append(Trap(site, idx, torch.full((idx.numel(),), 1e-4)))

    def forward():
        with torch.no_grad():
            gm(x)

    def bounds():
        with torch.no_grad():
            propagate(gm, Interval.from_box(x, args.eps, (0.0, 1.0)))

    def certify():
        certify_samples(gm, traps, x, y, args.eps, (0.0, 1.0), batch_size=args.batch)

    for fn in (forward, bounds, certify):  # warm-up
        fn()
    fwd, ibp, cert, ratios = [], [], [], []
    fwd_faults, ibp_faults = [], []
    for _ in range(args.rounds):  # paired rounds: forward then bounds back to back, so load hits both alike
        f = timed(forward, 1, fwd_faults)[0]
        i = timed(bounds, 1, ibp_faults)[0]
        fwd.append(f)
        ibp.append(i)
        ratios.append(f / i)
        cert += timed(certify, 1)
    n = args.batch
    ratio = statistics.median(ratios)
    result = {
        "model": "LeNet-5 (1x28x28)",
        "batch": n,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "forward_samples_per_s": round(n / statistics.median(fwd), 1),
        "interval_samples_per_s": round(n / statistics.median(ibp), 1),
        "interval_over_forward": round(ratio, 3),
        "target_ratio": round(1 / 3, 3),
        "meets_target": ratio >= 1 / 3,
        "best_forward_samples_per_s": round(n / min(fwd), 1),
        "best_interval_samples_per_s": round(n / min(ibp), 1),
        "certify_samples_per_s": round(n / statistics.median(cert), 1),
        "certify_traps": len(traps),
        # first-touch page faults per batch: fresh allocations are expensive on some VMs
        "forward_page_faults_per_batch": int(statistics.median(fwd_faults)),
        "interval_page_faults_per_batch": int(statistics.median(ibp_faults)),
        "torch": torch.__version__,
    }
    result["bound_methods"] = bound_methods(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return result


if __name__ == "__main__":
    main()
