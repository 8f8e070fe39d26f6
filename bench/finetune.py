"""CTT fine-tuning cost: one CTT epoch beside one plain training epoch of the same model, same data, same batches.

    python bench/finetune.py --json [--kind strict] [--objective ctt] [--threads 1] [--rounds 3] [--instrument]

The plain epoch is cross-entropy + RMSProp on the same traced LeNet-5 and the
same 3,000 training digits in the same order; the CTT epoch adds the natural
pre-activations' L_D and the interval bounds' L_C (``harden.train.finetune``; ``bounds_pass`` says whether
the one stacked natural + bounds pass of ``harden.train.stacked_bounds`` ran, or the general path).
``--objective detect-or-robust`` (or ``robust``) times that objective's epoch instead: bounds through to the
logits' input with the traps capped, the margin folded into the last layer (target <= 4).
Rounds alternate plain and CTT epochs back to back; the ratio (target <= 3) is
the median of the paired ratios, so a busy machine slows both sides alike.
``--instrument`` also times the whole ``harden instrument --method ctt-<kind>``
command on the main job (target <= 180 s on 2 cores) in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harden.examples.lenet import LeNet5  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.methods.base import FitContext, MethodSpec, Options  # noqa: E402
from harden.methods.ctt import CTTStrict  # noqa: E402
from harden.train.finetune import FinetuneConfig, _Traps  # noqa: E402


def epoch(step, x, y, batch: int, seed: int) -> float:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for b in range(0, len(x), batch):
        idx = order[b : b + batch]
        step(x[idx], y[idx])
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="strict", choices=["loose", "strict"])
    ap.add_argument("--objective", default="ctt", help="the fine-tuning objective (harden.train.objectives)")
    ap.add_argument("--eps", type=float, default=None, help="training eps (default: the config's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instrument", action="store_true", help="also time the whole harden instrument command")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_data("mnist")
    model = LeNet5()
    model.load_state_dict(torch.load(ROOT / "out/lenet5_mnist.pt", weights_only=True))
    gm = trace(model)
    sites, masks, _ = CTTStrict().plan(FitContext(gm=gm, data=data, options=Options(key="bench"),
                                                  settings=MethodSpec.of("ctt-strict").settings))
    cfg = FinetuneConfig(kind=args.kind, objective=args.objective, **({} if args.eps is None else {"eps": args.eps}))
    traps = _Traps(gm, sites, masks, cfg, data.input_range)
    traps.objective.refresh(traps.thresholds(data.train.x))
    for p in gm.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(gm.parameters(), lr=cfg.lr, weight_decay=0.0)

    def plain(xb, yb):
        loss = F.cross_entropy(gm(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ctt(xb, yb):
        ce, l_d, l_c = traps.losses(xb, yb)
        loss = ce + cfg.alpha * (cfg.detection_weight * l_d + l_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    x, y = data.train.x, data.train.y
    plain_s, ctt_s = [], []
    for r in range(args.rounds):
        plain_s.append(epoch(plain, x, y, cfg.batch_size, r))
        ctt_s.append(epoch(ctt, x, y, cfg.batch_size, r))
    ratios = [c / p for c, p in zip(ctt_s, plain_s)]
    result = {
        "model": "LeNet-5", "data": f"mnist train split ({len(x)} digits)", "batch": cfg.batch_size,
        "threads": args.threads, "kind": args.kind, "traps": {s: len(m) for s, m in masks.items()},
        "plain_epoch_s": round(statistics.median(plain_s), 3), "ctt_epoch_s": round(statistics.median(ctt_s), 3),
        "ratio": round(statistics.median(ratios), 2), "target_ratio": 3.0 if args.objective == "ctt" else 4.0,
        "objective": args.objective, "eps": cfg.eps,
        "bounds_pass": "stacked" if getattr(getattr(traps.objective, "bounds", traps), "stacked") is not None
        else "general",
    }
    if args.instrument:
        out = Path("/tmp") / f"bench_finetune_{os.getpid()}.hardened"
        command = [str(ROOT / ".venv/bin/harden"), "instrument", "out/lenet5_mnist.pt", "--arch",
                   "harden.examples.lenet:LeNet5", "--data", "mnist", "--method", f"ctt-{args.kind}", "--key", "bench",
                   "-o", str(out), "--json"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        result["instrument_s"] = round(time.perf_counter() - start, 1)
        result["instrument_command"] = " ".join(command[1:-3])
        result["target_instrument_s"] = 180
        out.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
