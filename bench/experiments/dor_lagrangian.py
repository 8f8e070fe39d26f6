"""docs/results/detect-or-robust.md: a prototype of a certificate that lets the traps cut the box: Lagrange multipliers on the trap constraints.

    OMP_NUM_THREADS=1 python bench/experiments/dor_lagrangian.py robust 0.04 0
    OMP_NUM_THREADS=1 python bench/experiments/dor_lagrangian.py dor 0.04 16

On the suite's ``cnn-digits`` pair only (PlainCNN: conv-relu-conv-relu-pool-fc1-relu3-fc2).  Interval bounds up to
fc1's input g, then a linear relaxation (CROWN) of fc2 . relu3 . fc1 down to g's box.  ``harden certify`` can use a
trap's "no alarm" only by capping the trap's own interval; here, for any lambda >= 0,

    min over the box of [ z_y - z_j + sum_k lambda_jk (u_k - T_k) ]  <=  min over the box's quiet inputs of z_y - z_j

(u_k: fc1's trap pre-activations, T_k their natural maxima), so a trap constraint correlated with the margin cuts
the box.  Mode ``dor``: ``ntrap`` random fc1 neurons are traps, lambda per (true class, class j, trap) is learned
with the weights (and refined per sample by 50 Adam steps at evaluation); mode ``robust``: the same bound without
traps.  Both train with CE + hinge(0.1 - bound) for ``steps`` steps, eps growing over the first half.  Prints the
calibration figures every 100 steps and, on the test split at eps / 2, eps, 2 eps: accuracy, trap FPR, the
certified fraction with the traps and the same bound without them; then (mode robust) the robust fraction when the
pixels that are non-zero in at most q of the training split may not move at all: what an ideal pixel-level trap
could add.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.suite.pairs import load_pair  # noqa: E402


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, eps, ntrap = argv[0], float(argv[1]), int(argv[2])
    steps = int(argv[3]) if len(argv) > 3 else 600
    loaded = load_pair("cnn-digits")
    model, data = loaded.model, loaded.data
    k_classes = data.num_classes
    torch.manual_seed(0)
    traps = torch.randperm(model.fc1.out_features, generator=torch.Generator().manual_seed(1))[:ntrap]
    theta = torch.zeros(k_classes, k_classes, max(ntrap, 1), requires_grad=True)   # lambda = softplus(theta - 2)
    use_traps = mode == "dor" and ntrap > 0

    def conv_box(m, lo, hi):
        c, r = (hi + lo) / 2, (hi - lo) / 2
        cc, rr = m(c), F.conv2d(r, m.weight.abs(), None, m.stride, m.padding)
        return cc - rr, cc + rr

    def g_box(x, e):
        lo, hi = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
        lo, hi = conv_box(model.conv1, lo, hi)
        lo, hi = conv_box(model.conv2, lo.relu(), hi.relu())
        return F.max_pool2d(lo.relu(), 2).flatten(1), F.max_pool2d(hi.relu(), 2).flatten(1)

    def natural_u(x):
        return model.fc1(model.flatten(model.pool(model.relu2(model.conv2(model.relu1(model.conv1(x)))))))

    def linear_bound(a, const, gc, gr, w1, b1):
        aw = torch.einsum("nku,ud->nkd", a, w1)
        return (torch.einsum("nkd,nd->nk", aw, gc) - torch.einsum("nkd,nd->nk", aw.abs(), gr)
                + (a * b1).sum(-1) + const)

    def bound(x, y, e, t, lam=None, with_traps=True):
        gl, gh = g_box(x, e)
        w1, b1, w2, b2 = model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias
        gc, gr = (gh + gl) / 2, (gh - gl) / 2
        uc, ur = F.linear(gc, w1, b1), F.linear(gr, w1.abs())
        ul, uh = uc - ur, uc + ur
        always = torch.zeros(len(x), dtype=torch.bool)
        if with_traps and use_traps:
            uh = uh.clone()
            uh[:, traps] = torch.minimum(uh[:, traps], t)
            always = (ul[:, traps] > t).any(1)
        unstable, active = (ul < 0) & (uh > 0), ul >= 0
        up_slope = torch.where(unstable, uh / (uh - ul).clamp_min(1e-12), active.float())
        up_off = torch.where(unstable, -up_slope * ul, torch.zeros_like(ul))
        lo_slope = torch.where(unstable, (uh > -ul).float(), active.float())
        c = w2[y].unsqueeze(1) - w2.unsqueeze(0)
        cb = b2[y].unsqueeze(1) - b2.unsqueeze(0)
        slope = torch.where(c >= 0, lo_slope.unsqueeze(1), up_slope.unsqueeze(1))
        offset = torch.where(c >= 0, torch.zeros_like(c), up_off.unsqueeze(1))
        a0, const0 = c * slope, cb + (c * offset).sum(-1)
        value = linear_bound(a0, const0, gc, gr, w1, b1)
        if with_traps and use_traps:
            lam = F.softplus(theta[y] - 2.0)[:, :, :ntrap] if lam is None else lam
            with_lam = linear_bound(a0.index_add(2, traps, lam), const0 - (lam * t).sum(-1), gc, gr, w1, b1)
            value = torch.maximum(value, with_lam)   # lambda = 0 is always allowed
        return value.scatter(1, y.unsqueeze(1), float("inf")).amin(1), always

    def thresholds(x):
        with torch.no_grad():
            return natural_u(x)[:, traps].amax(0) if ntrap else torch.zeros(0)

    def evaluate(xe, ye, e, t, refine=0):
        with torch.no_grad():
            accuracy = float((model(xe).argmax(1) == ye).float().mean())
            fpr = float((natural_u(xe)[:, traps] > t).any(1).float().mean()) if ntrap else 0.0
        margin, always = bound(xe, ye, e, t)
        if refine and use_traps:
            lam = F.softplus(theta[ye] - 2.0)[:, :, :ntrap].detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([lam], lr=0.05)
            for _ in range(refine):
                m, _ = bound(xe, ye, e, t, lam=lam.clamp_min(0))
                optimizer.zero_grad()
                (-m.clamp(max=1.0)).sum().backward()
                optimizer.step()
            with torch.no_grad():
                margin = torch.maximum(margin, bound(xe, ye, e, t, lam=lam.clamp_min(0))[0])
        plain, _ = bound(xe, ye, e, t, with_traps=False)
        return {"accuracy": round(accuracy, 4), "trap_fpr": round(fpr, 4),
                "certified": round(float((always | (margin > 0)).float().mean()), 4),
                "same_bound_without_traps": round(float((plain > 0).float().mean()), 4)}

    x, y = data.train.x, data.train.y
    groups = [{"params": list(model.parameters())}] + ([{"params": [theta], "lr": 3e-2}] if use_traps else [])
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    t = thresholds(x)
    generator = torch.Generator().manual_seed(0)
    step, warm = 0, steps // 2
    while step < steps:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            e = eps * min(1.0, (step + 1) / warm)
            ce = F.cross_entropy(model(x[idx]), y[idx])
            margin, always = bound(x[idx], y[idx], e, t)
            hinge = torch.where(always, torch.zeros_like(margin), F.relu(0.1 - margin)).mean()
            quiet = F.relu(natural_u(x[idx])[:, traps] - t).sum(1).mean() if use_traps else torch.zeros(())
            optimizer.zero_grad()
            (ce + hinge + quiet).backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                t = thresholds(x)
                print(step, "calibration", evaluate(data.calibration.x, data.calibration.y, eps, t), flush=True)
            if step >= steps:
                break
    t = thresholds(x)
    for e in (eps / 2, eps, 2 * eps):
        print(f"test eps {e:g}", evaluate(data.test.x, data.test.y, e, t, refine=50))
    if mode == "robust":
        for q in (0.0, 0.01, 0.05):
            pinned = (x > 0).float().mean(0, keepdim=True) <= q
            for e in (eps, 2 * eps):
                per_pixel = torch.where(pinned, torch.zeros(pinned.shape), torch.full(pinned.shape, e))
                with torch.no_grad():
                    margin, _ = bound(data.test.x, data.test.y, per_pixel, t, with_traps=False)
                print(f"pixels non-zero in <= {q:g} of the training split cannot move ({int(pinned.sum())} of "
                      f"{pinned.numel()}): eps {e:g} robust {float((margin > 0).float().mean()):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
