"""`harden instrument` for CTT with any FinetuneConfig field, including those the CLI does not expose.

    .venv/bin/python -m bench.experiments.ctt_instrument --method ctt-strict --key readme-demo-key \
        -o out/x.hardened --set anneal=detection --set alpha=1.0 --set trap_scale=std

Same path as the CLI (harden.instrumentation.pipeline.instrument + save_bundle) on the example LeNet-5 / bundled MNIST; the
bundle then goes through the ordinary `harden export` / `harden evaluate` / `harden certify`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.instrumentation.pipeline import instrument  # noqa: E402
from harden.bundle.archive import save_bundle  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.io.model import load_model  # noqa: E402
from harden.methods.base import Options  # noqa: E402
from harden.train.finetune import FinetuneConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="ctt-strict")
    ap.add_argument("--key", default="readme-demo-key")
    ap.add_argument("--mask-ratio", type=float, default=0.01)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--set", action="append", default=[], help="FinetuneConfig field=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    probe = FinetuneConfig(kind="strict")
    extra = {}
    for item in args.set:
        name, value = item.split("=", 1)
        if not hasattr(probe, name):       # a method option outside FinetuneConfig (e.g. trap_placement)
            extra[name] = value
            continue
        current = getattr(probe, name)
        extra[name] = value if isinstance(current, str) else type(current or 0.0)(value) if current is not None \
            else float(value) if "." in value or "e" in value else int(value)
    options = Options(key=args.key, mask_ratio=args.mask_ratio, extra=extra)
    net = load_model(Path("out/lenet5_mnist.pt"), "harden.examples.lenet:LeNet5", False)
    hardened = instrument(net, load_data("mnist"), [args.method], options)
    manifest = save_bundle(hardened, Path(args.output))
    method = next(m for m in manifest["methods"] if m["name"] == args.method)
    print(json.dumps({"bundle": args.output, "extra": extra, "best_epoch": method["config"].get("finetune", {}).get("best_epoch"),
                      "summary": {k: v for k, v in manifest.items() if k in ("facts", "accuracy", "summary")}},
                     default=str))


if __name__ == "__main__":
    main()
