"""docs/results/ctt.md "What decides the outcome": per CTT trap, the clean margin to its alarm against what an attack moves."""

#   python -m bench.experiments.ctt_margins --bundle out/ctt.hardened --key readme-demo-key --scale std [--n-test 150]
#
# For a fine-tuned LeNet-5 state (``ctt_explore --save``; none: the original model, i.e. ctt-lite's weights) and the
# masks ``--method ctt-*`` draws, the exported thresholds are rebuilt exactly as harden does with the natural trap
# rule (T_j = max(T, natural maximum of the trap's pre-activation on the training split), then one shared shift
# calibrated on the calibration split to --fpr).  A trap j fires on input x' iff z_j(x') > T_j + shift, so with
# z the clean pre-activation of an originally-correct test input:
#
#   margin = T_j + shift - z(x)          how far the trap sits below its alarm on the clean input
#   dz     = z(x_adv) - z(x)             how far the attack moved it
#
# Per site and attack the script prints the distribution of both, the fraction of (input, trap) pairs the attack
# leaves untouched (|dz| <= 1e-4 * the site's natural spread, i.e. float noise) and, for the relu1 traps (whose
# receptive field is a 5x5 input window), how much of the attack's perturbation lands in that window.
# One JSON line per (attack, site) and a per-attack summary line.

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.experiments.ctt_explore import fgsm, pgd  # noqa: E402
from harden.examples.lenet import LeNet5  # noqa: E402
from harden.detectors.calibration import calibrate  # noqa: E402
from harden.graph.analyse import feature_extractor  # noqa: E402
from harden.graph.trace import trace  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.methods.base import FitContext, Options  # noqa: E402
from harden.methods.ctt import CTTFinetuneOptions, CTTLoose  # noqa: E402
from harden.train.finetune import pre_activation  # noqa: E402


def masked_pre(gm, pres, masks, x, batch=500):
    """Per site, the trap pre-activations [N, count] (numpy), and the logits."""
    ext = feature_extractor(gm, pres)
    outs, logits = [[] for _ in pres], []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            lg, *acts = ext(x[s : s + batch])
            logits.append(lg)
            for o, a, m in zip(outs, acts, masks):
                o.append(a.flatten(1).index_select(1, m))
    return torch.cat(logits), [torch.cat(o).numpy() for o in outs]


def quantiles(v, qs=(0.1, 0.5, 0.9)):
    return [round(float(np.quantile(v, q)), 4) for q in qs] if len(v) else None


def relu1_window_share(delta, mask, size=28, pad=2, k=5):
    """For relu1 traps (conv1 5x5, pad 2, 6x28x28 output): per (input, trap) the L2 of the perturbation inside
    the trap's input window over the perturbation's total L2."""
    flat = delta.reshape(len(delta), -1)
    total = np.linalg.norm(flat, axis=1) + 1e-12
    shares = np.zeros((len(delta), len(mask)))
    for j, pos in enumerate(mask.tolist()):
        rem = pos % (size * size)
        i, jj = divmod(rem, size)
        win = delta[:, 0, max(0, i - pad) : i - pad + k, max(0, jj - pad) : jj - pad + k].reshape(len(delta), -1)
        shares[:, j] = np.linalg.norm(win, axis=1) / total
    return shares


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default="out/lenet5_mnist.pt")
    ap.add_argument("--load", default=None, help="fine-tuned state_dict (ctt_explore --save); none: the original")
    ap.add_argument("--bundle", default=None, help="take the fine-tuned weights from a .hardened bundle instead")
    ap.add_argument("--key", default="readme-demo-key")
    ap.add_argument("--mask-ratio", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--fpr-confidence", type=float, default=0.9, help="as harden instrument's (0: empirical quantile)")
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--attacks", default="fgsm0.1,pgd0.1,deepfool,cw")
    ap.add_argument("--trap-quantile", type=float, default=1.0,
                    help="T_j = the trap's natural quantile on the training split (1: maximum, harden's rule)")
    ap.add_argument("--scale", default="none", choices=("none", "std"),
                    help="std: the calibration shift is in units of each trap's natural std (floored at "
                         "--scale-floor), i.e. trap j fires at T_j + shift * s_j; none: one shift for all (harden)")
    ap.add_argument("--scale-floor", type=float, default=0.01)
    ap.add_argument("--per-trap", action="store_true", help="also one line per trap and attack")
    ap.add_argument("--placement", default="key", choices=("key", "quiet"),
                    help="quiet: instead of the key's uniform mask, the same number of traps per site drawn (seeded "
                         "by the key) among the positions whose training pre-activation std is below --quiet-std: "
                         "an experiment on trap placement, not what harden exports")
    ap.add_argument("--quiet-std", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    data = load_data("mnist")
    model = LeNet5()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    gm = trace(model)
    ctx = FitContext(gm=gm, data=data, options=Options(key=args.key),
                     settings=CTTFinetuneOptions.parse("ctt-loose", {"mask_ratio": args.mask_ratio}))
    sites, masks_d, _ = CTTLoose().plan(ctx)
    if args.load:
        gm.load_state_dict(torch.load(args.load, weights_only=True))
    if args.bundle:
        from harden.bundle.archive import load_bundle

        gm.load_state_dict(load_bundle(args.bundle)[0].classifier.state_dict())
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.eval()
    pres = [pre_activation(gm, s) for s in sites]
    masks = [masks_d[s] for s in sites]
    if args.placement == "quiet":
        ext = feature_extractor(gm, pres)
        with torch.no_grad():
            _, *full = ext(data.train.x)
        from harden.methods.base import key_seed

        chosen = []
        for s, a, m in zip(sites, full, masks):
            std = a.flatten(1).std(0)
            eligible = torch.nonzero(std < args.quiet_std).flatten()
            gen = torch.Generator().manual_seed(key_seed(args.key, f"quiet:{s}"))
            pick = eligible[torch.randperm(len(eligible), generator=gen)[: len(m)]] if len(eligible) else m
            chosen.append(pick.sort().values)
            print(json.dumps({"site": s, "eligible": int(len(eligible)), "picked": int(len(pick))}), flush=True)
        masks = chosen

    _, train = masked_pre(gm, pres, masks, data.train.x)
    tj = [np.maximum(args.threshold, np.quantile(t, args.trap_quantile, axis=0)) for t in train]
    spread = [np.maximum(t.std(0), 1e-6) for t in train]
    scale = [np.maximum(sp, args.scale_floor) if args.scale == "std" else np.ones_like(sp) for sp in spread]
    _, cal = masked_pre(gm, pres, masks, data.calibration.x)
    cal_raw = np.concatenate([(np.maximum(c, 0) - t) / k for c, t, k in zip(cal, tj, scale)], axis=1).max(1)
    shift = calibrate(cal_raw[:, None], 1, args.fpr, args.fpr_confidence).thresholds[0]
    x, y = data.test.x[: args.n_test], data.test.y[: args.n_test]
    logits, clean = masked_pre(gm, pres, masks, x)
    correct = (logits.argmax(1) == y).numpy()
    clean_fire = np.concatenate([(np.maximum(c, 0) - t) / k for c, t, k in zip(clean, tj, scale)],
                                axis=1).max(1) > shift
    print(json.dumps({"load": args.load or args.bundle, "key": args.key, "traps": {s: len(m) for s, m in zip(sites, masks)},
                      "shift": round(float(shift), 5), "test_acc": round(float(correct.mean()), 3),
                      "test_fpr": round(float(clean_fire.mean()), 3), "trap_quantile": args.trap_quantile, "scale": args.scale,
                      "T_j_minus_T_median": {s: round(float(np.median(t - args.threshold)), 4)
                                             for s, t in zip(sites, tj)}}), flush=True)

    from harden.attacks.catalog import parse_attack, run_attack

    makers = {"fgsm0.1": lambda: fgsm(gm, x, y, 0.1), "pgd0.1": lambda: pgd(gm, x, y, 0.1),
              "fgsm0.2": lambda: fgsm(gm, x, y, 0.2)}
    for sigma in ("0.002", "0.005"):  # benign noise, for comparison with what minimal attacks do to the traps
        makers[f"gauss{sigma}"] = lambda s=float(sigma): (x + s * torch.randn(
            x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for spec in ("deepfool", "cw", "bim:eps=0.1"):
        makers[spec.split(":")[0]] = lambda s=spec: torch.from_numpy(run_attack(
            gm, parse_attack(s), x.numpy(), y.numpy(), input_range=(0.0, 1.0), num_classes=10))
    keep = np.flatnonzero(correct)
    for name in args.attacks.split(","):
        adv = makers[name]()
        alogits, advz = masked_pre(gm, pres, masks, adv)
        delta = (adv - x).numpy()[keep]
        fired_any = np.zeros(len(keep), dtype=bool)
        shortfall = np.full(len(keep), np.inf)
        for s, c, a, t, sp, m, k in zip(sites, clean, advz, tj, spread, masks, scale):
            c, a = c[keep], a[keep]
            margin = t + shift * k - c
            dz = a - c
            untouched = np.abs(dz) <= 1e-4 * sp
            fired = dz > margin
            fired_any |= fired.any(1)
            shortfall = np.minimum(shortfall, (margin - dz).min(1))
            row = {"attack": name, "site": s, "traps": len(m),
                   "clean_relu_off": round(float((c < 0).mean()), 3),
                   "margin_q10_50_90": quantiles(margin.ravel()),
                   "dz_q10_50_90": quantiles(dz.ravel()),
                   "abs_dz_median": round(float(np.median(np.abs(dz))), 4),
                   "untouched": round(float(untouched.mean()), 3),
                   "dz_over_margin_median": round(float(np.median(dz / np.maximum(margin, 1e-6))), 4),
                   "pairs_fired": round(float(fired.mean()), 4),
                   "inputs_fired": round(float(fired.any(1).mean()), 3),
                   "natural_spread_median": round(float(np.median(sp)), 4)}
            if s == sites[0]:
                share = relu1_window_share(delta, m)
                row["window_share_q10_50_90"] = quantiles(share.ravel())
                row["window_l2_median"] = round(float(np.median(share * np.linalg.norm(
                    delta.reshape(len(delta), -1), axis=1)[:, None])), 4)
            print(json.dumps(row), flush=True)
            if args.per_trap:
                for j in range(len(m)):
                    print(json.dumps({"attack": name, "site": s, "trap": j, "T_j-T": round(float(t[j] - args.threshold), 4),
                                      "std": round(float(sp[j]), 4), "margin_q10_50": quantiles(margin[:, j], (0.1, 0.5)),
                                      "abs_dz_median": round(float(np.median(np.abs(dz[:, j]))), 4),
                                      "fired": round(float(fired[:, j].mean()), 3)}), flush=True)
        adv_acc = float((alogits.argmax(1) == y).float().mean())
        l2 = float(np.linalg.norm(delta.reshape(len(delta), -1), axis=1).mean())
        wrong = (alogits.argmax(1) != y).numpy()[keep]
        # where the perturbation goes: background pixels (exactly 0 in the clean digit) vs the rest
        x0 = x.numpy()[keep].reshape(len(keep), -1) == 0
        d = np.abs(delta.reshape(len(keep), -1))
        moved = d > 1e-6
        on_bg = (d**2 * x0).sum(1) / np.maximum((d**2).sum(1), 1e-12)
        pixels = {"background_share": round(float(x0.mean()), 3),
                  "background_pixels_moved": round(float(moved[x0].mean()), 3),
                  "other_pixels_moved": round(float(moved[~x0].mean()), 3),
                  "l2sq_share_on_background_median": round(float(np.median(on_bg[moved.any(1)])), 3)
                  if moved.any() else None,
                  "inputs_unchanged": round(float((~moved.any(1)).mean()), 3)}
        print(json.dumps({"attack": name, "det": round(float(fired_any.mean()), 3),
                          "det_successful": round(float(fired_any[wrong].mean()), 3) if wrong.any() else None,
                          "adv_acc": round(adv_acc, 3), "pixels": pixels,
                          "l2": round(l2, 3), "shortfall_of_missed_q10_50_90":
                          quantiles(shortfall[~fired_any])}), flush=True)


if __name__ == "__main__":
    main()
