"""docs/results/ctt.md "trap_placement=quiet": alarm rates of bundles on clean test digits under small benign changes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.bundle.archive import load_bundle  # noqa: E402
from harden.io.data import load_data  # noqa: E402


def main(argv=None):
    # Gaussian noise of std 0.002 / 0.005 / 0.02 (clipped to [0, 1], seed 0), a one-pixel shift to the right and a
    # contrast of x0.95 on the first --n digits of the bundled MNIST test split; the bundle's combined alarm (torch).
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = load_data("mnist").test.x[: args.n]
    generator = torch.Generator().manual_seed(0)
    variants = {"clean": x}
    for sigma in (0.002, 0.005, 0.02):
        variants[f"gauss {sigma}"] = (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    variants["shift 1px"] = torch.roll(x, 1, dims=3)
    variants["contrast 0.95"] = x * 0.95
    for path in args.bundles:
        hardened, _ = load_bundle(path)
        rates = {name: round(float(hardened.run(v)["alarm"].mean()), 3) for name, v in variants.items()}
        print(json.dumps({"bundle": path, "alarm_rate": rates}), flush=True)


if __name__ == "__main__":
    main()
