"""docs/results/ctt.md (proxy figures): CTT fine-tuning on the example LeNet-5, with the exported trap score measured after each check."""

# Runs harden's own fine-tuning loop (harden.train.finetune.finetune_ctt) on the masks --method ctt-<kind> draws and
# after every check (--every) measures, with the trap score as the exported head computes it: the calibration
# trap-FPR at T, the threshold calibration would set at --fpr, the clean test FPR there, and the detection (alarm
# rate among originally-correct test inputs) of torch FGSM / PGD at eps 0.1 (--full: also ART BIM, DeepFool, CW)
# under three trap rules: fixed T (`det`), natural (`hyb_det`) and natural + scaled (`sc_det`).  One JSON line each.


from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.examples.lenet import LeNet5  # noqa: E402
from harden.detectors.calibration import calibrate  # noqa: E402
from harden.graph.analyse import feature_extractor  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.methods.base import FitContext, Options  # noqa: E402
from harden.methods.ctt import CTTFinetuneOptions, CTTLoose  # noqa: E402
from harden.train.finetune import FinetuneConfig, finetune_ctt  # noqa: E402


def trap_score(gm, sites, masks, x, threshold):
    ext = feature_extractor(gm, sites)
    with torch.no_grad():
        logits, *acts = ext(x)
        per = [(a.flatten(1).index_select(1, masks[s]) - threshold) for s, a in zip(sites, acts)]
    per = torch.cat(per, dim=1)
    return logits, per.amax(dim=1).numpy(), per.numpy()


def fgsm(gm, x, y, eps, lo=0.0, hi=1.0):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(gm(x), y)
    (g,) = torch.autograd.grad(loss, x)
    return (x + eps * g.sign()).clamp(lo, hi).detach()


def pgd(gm, x, y, eps, steps=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    step = 2.5 * eps / steps
    adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(gm(adv), y)
        (g,) = torch.autograd.grad(loss, adv)
        adv = torch.min(torch.max(adv.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def measure(gm, sites, masks, data, cfg, n_test, full=False, confidence=0.9):
    for p in gm.parameters():
        p.requires_grad_(False)
    t = cfg.threshold
    _, cal_raw, cal_per = trap_score(gm, sites, masks, data.calibration.x, t)
    cal = calibrate(cal_raw[:, None], 1, cfg.fpr, confidence)
    thr = cal.thresholds[0]
    x, y = data.test.x[:n_test], data.test.y[:n_test]
    logits, raw, _ = trap_score(gm, sites, masks, x, t)
    correct = (logits.argmax(1) == y).numpy()
    out = {"cal_fpr_at_T": float((cal_raw > 0).mean()), "threshold": thr,
           "per_trap_cal_fire": [round(float(v), 3) for v in (cal_per > 0).mean(0)],
           "test_acc": float(correct.mean()), "test_fpr": float((raw > thr).mean()),
           "test_fpr_at_T": float((raw > 0).mean())}
    # hybrid: per-neuron T = max(T, the neuron's natural maximum on the training split)
    _, _, train_per = trap_score(gm, sites, masks, data.train.x, t)
    shift = np.maximum(train_per.max(0), 0.0)
    hyb_cal = (cal_per - shift).max(1)
    hyb_thr = calibrate(hyb_cal[:, None], 1, cfg.fpr, confidence).thresholds[0]
    _, _, test_per = trap_score(gm, sites, masks, x, t)
    hyb_raw = (test_per - shift).max(1)
    out["hybrid"] = {"threshold": hyb_thr, "cal_fpr_at_0": float((hyb_cal > 0).mean()),
                     "test_fpr": float((hyb_raw > hyb_thr).mean()), "raised": int((shift > 0).sum())}
    # scaled (trap_scale="std"): the same thresholds, excess over each trap's natural pre-activation std
    from harden.train.finetune import pre_activation

    pre_ext = feature_extractor(gm, [pre_activation(gm, s) for s in sites])
    with torch.no_grad():
        _, *pre = pre_ext(data.train.x)
    scale = torch.cat([a.flatten(1).index_select(1, masks[s]) for s, a in zip(sites, pre)], 1).std(0)
    scale = scale.clamp_min(0.01).numpy()
    sc_cal = ((cal_per - shift) / scale).max(1)
    sc_thr = calibrate(sc_cal[:, None], 1, cfg.fpr, confidence).thresholds[0]
    sc_raw = ((test_per - shift) / scale).max(1)
    out["scaled"] = {"threshold": sc_thr, "test_fpr": float((sc_raw > sc_thr).mean())}
    attacks = {"fgsm0.1": lambda: fgsm(gm, x, y, 0.1), "pgd0.1": lambda: pgd(gm, x, y, 0.1)}
    if full:
        from harden.attacks.catalog import parse_attack, run_attack

        for spec in ("fgsm:eps=0.2", "bim:eps=0.1", "pgd:eps=0.2", "deepfool", "cw"):
            attacks[spec] = (lambda s=spec: torch.from_numpy(run_attack(
                gm, parse_attack(s), x.numpy(), y.numpy(), input_range=(0.0, 1.0), num_classes=10)))
    from sklearn.metrics import roc_auc_score

    for name, make in attacks.items():
        adv = make()
        alogits, araw, aper = trap_score(gm, sites, masks, adv, t)
        det = araw[correct] > thr
        ahyb = (aper - shift).max(1)
        labels = np.r_[np.zeros(len(raw)), np.ones(int(correct.sum()))]
        out[name] = {"det": round(float(det.mean()), 3), "det_at_T": round(float((araw[correct] > 0).mean()), 3),
                     "acc": round(float((alogits.argmax(1) == y).float().mean()), 3),
                     "auc": round(float(roc_auc_score(labels, np.r_[raw, araw[correct]])), 3),
                     "hyb_det": round(float((ahyb[correct] > hyb_thr).mean()), 3),
                     "hyb_auc": round(float(roc_auc_score(labels, np.r_[hyb_raw, ahyb[correct]])), 3),
                     "sc_det": round(float((((aper - shift) / scale).max(1)[correct] > sc_thr).mean()), 3),
                     "trap_fire": [round(float(v), 2) for v in (aper[correct] > 0).mean(0)]}
    return out


def _value(current, text: str):
    """``text`` as the type of the FinetuneConfig field's current value (a number when it is None)."""
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if current is None:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    return type(current)(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    ap.add_argument("--kind", default="loose")
    ap.add_argument("--key", default="0")
    ap.add_argument("--mask-ratio", type=float, default=0.01)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None)
    ap.add_argument("--save-every", default=None, help="save each epoch's state_dict to PREFIX<epoch>.pt")
    ap.add_argument("--load", default=None, help="measure a saved state_dict (no training)")
    ap.add_argument("--set", action="append", default=[], help="FinetuneConfig field=value")
    ap.add_argument("--fpr-confidence", type=float, default=0.9, help="as harden instrument's (0: empirical quantile)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_data("mnist")
    model = LeNet5()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    gm = trace(model)
    given = {"mask_ratio": args.mask_ratio, **({"layers": args.layers} if args.layers else {})}
    ctx = FitContext(gm=gm, data=data, options=Options(key=args.key),
                     settings=CTTFinetuneOptions.parse(f"ctt-{args.kind}", given))
    sites, masks, sizes = CTTLoose().plan(ctx)
    cfg = FinetuneConfig(kind=args.kind)
    for item in args.set:
        k, v = item.split("=", 1)
        setattr(cfg, k, _value(getattr(cfg, k), v))
    head = {"config": {k: v for k, v in cfg.__dict__.items()}, "key": args.key, "mask_ratio": args.mask_ratio,
            "layers": args.layers, "traps": {s: len(m) for s, m in masks.items()}}
    print(json.dumps(head), flush=True)
    start = time.perf_counter()
    if args.load:
        gm.load_state_dict(torch.load(args.load, weights_only=True))
        print(json.dumps({"loaded": args.load, "final": measure(gm, sites, masks, data, cfg, args.n_test, args.full, args.fpr_confidence)}))
        return

    def on_epoch(record, g):
        line = {"epoch": record.epoch, "alpha": round(record.alpha, 4), "ce": round(record.cross_entropy, 4),
                "l_d": round(record.l_d, 5), "l_c": round(record.l_c, 5), "cal_acc": record.accuracy,
                "cal_fpr": record.fpr, "cal_l_c": round(record.cal_l_c, 5), "sec": round(record.seconds, 1)}
        if args.save_every:
            torch.save(g.state_dict(), f"{args.save_every}{record.epoch}.pt")
        if args.every and (record.epoch % args.every == 0 or record.epoch == cfg.epochs):
            g_copy = __import__("copy").deepcopy(g)
            line.update(measure(g_copy, sites, masks, data, cfg, args.n_test, confidence=args.fpr_confidence))
        print(json.dumps(line), flush=True)

    history, best, _, _ = finetune_ctt(gm, sites, masks, (data.train.x, data.train.y),
                                 (data.calibration.x, data.calibration.y), data.input_range, cfg,
                                 on_epoch=on_epoch)
    final = measure(gm, sites, masks, data, cfg, args.n_test, full=args.full, confidence=args.fpr_confidence)
    print(json.dumps({"best_epoch": best, "final": final, "seconds": round(time.perf_counter() - start, 1)}),
          flush=True)
    if args.save:
        torch.save(gm.state_dict(), args.save)


if __name__ == "__main__":
    main()
