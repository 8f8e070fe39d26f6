"""The Lagrangian detect-or-robust bound (harden.bounds.lagrangian): a trap constraint cuts the box, soundly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from harden.bounds import lagrangian
from harden.bounds.propagate import run_recorded
from harden.certification.certify import Trap, certify_samples, check_certificates
from harden.graph.trace import trace


def relu_nodes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]


def attack_direction_trap():
    """margin = 0.6 - x0 (class 0 at x = (0.5, 0.5); a wrong label from x0 > 0.6 on), read through the stable
    neuron h0 = relu(x0 + 1); the trap h1 = relu(x0 - 0.5), T = 0.05, is exactly the attack direction and feeds
    nothing.  Over the eps-0.2 box x0 in [0.3, 0.7]: the margin reaches -0.1 (not robust), but every quiet input
    has x0 <= 0.55, so margin >= 0.05 there.  Capping h1 changes nothing (the margin does not read it); the
    Lagrangian with lambda = 1 cancels x0: 0.6 - x0 + (x0 - 0.5 - 0.05) = 0.05."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([1.0, -0.5]))
        net[2].weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([1.6, 0.0]))
    gm = trace(net.eval())
    return gm, [Trap(relu_nodes(gm)[0], torch.tensor([1]), torch.tensor([0.05]))]


X, Y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])


@pytest.mark.parametrize("bounds", ["crown", "crown-ibp"])
def test_the_lagrangian_certifies_what_the_cap_cannot(bounds):
    gm, traps = attack_direction_trap()
    capped = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds=bounds, lagrangian_steps=0)
    assert capped["robust"].tolist() == [False] and capped["detect_or_robust"].tolist() == [False]
    assert capped["margin_detect"].item() == pytest.approx(-0.1, abs=1e-5)
    cut = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds=bounds)
    assert cut["robust"].tolist() == [False] and cut["detect_or_robust"].tolist() == [True]
    assert not cut["always_alarm"].any()
    # the best bound over lambda is 0.05 (at lambda = 1); it can never exceed the true minimum over quiet inputs
    assert 0.0 < cut["margin_detect"].item() <= 0.05 + 1e-5
    # the robust figure is untouched
    assert torch.equal(cut["margin"], capped["margin"])


def test_the_hand_built_certificate_survives_the_check_and_a_grid_of_the_quiet_region():
    gm, traps = attack_direction_trap()
    r = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds="crown")
    check = check_certificates(gm, traps, X, Y, 0.2, (0.0, 1.0), 400, bounds="crown")
    assert check.ok, check.to_dict()
    grid = torch.stack(torch.meshgrid(torch.linspace(0.3, 0.7, 81), torch.linspace(0.3, 0.7, 5), indexing="ij"),
                       -1).reshape(-1, 2)
    with torch.no_grad():
        logits, values = run_recorded(gm, grid, [traps[0].node])
    quiet = values[traps[0].node][:, 1] <= 0.05
    margin = logits[:, 0] - logits[:, 1]
    assert float(margin[quiet].min()) >= r["margin_detect"].item() - 1e-6
    assert float(margin.min()) < 0   # the box itself is not robust


def test_a_trap_that_cannot_fire_adds_nothing():
    gm, _ = attack_direction_trap()
    traps = [Trap(relu_nodes(gm)[0], torch.tensor([1]), torch.tensor([0.5]))]   # x0 - 0.5 <= 0.2 < 0.5
    r = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds="crown")
    assert r["detect_or_robust"].tolist() == [False]
    assert r["margin_detect"].item() == pytest.approx(-0.1, abs=1e-5)


def test_the_multipliers_run_only_where_some_trap_can_fire(monkeypatch):
    gm, firing = attack_direction_trap()
    quiet = [Trap(relu_nodes(gm)[0], torch.tensor([1]), torch.tensor([0.5]))]   # cannot fire in the eps-0.2 box
    seen = []
    original = lagrangian.lagrangian_margin

    def spy(*args, active=None, **kwargs):
        seen.append(active.tolist())
        return original(*args, active=active, **kwargs)

    monkeypatch.setattr(lagrangian, "lagrangian_margin", spy)
    x, y = torch.cat([X, X]), torch.cat([Y, Y])
    for traps, expected in ((quiet, [False, False]), (firing, [True, True])):
        seen.clear()
        certify_samples(gm, traps, x, y, 0.2, (0.0, 1.0), bounds="crown")
        assert seen == [expected]


def _random_net(seed: int, conv: bool) -> nn.Module:
    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 8),
                            nn.ReLU(), nn.Linear(8, 3))
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(3.0)   # default init is nearly constant on [0, 1]^4: every box robust
    return net.eval()


def _traps_near_natural(gm, x: torch.Tensor, per_site: int, slack: float, generator) -> list[Trap]:
    """Hand-built traps: ``per_site`` neurons per ReLU with T a little above the largest natural activation, so
    natural inputs stay quiet and the box may fire them."""
    sites = relu_nodes(gm)
    _, values = run_recorded(gm, x, sites)
    traps = []
    for site in sites:
        flat = values[site].flatten(1)
        idx = torch.randperm(flat.shape[1], generator=generator)[:per_site]
        traps.append(Trap(site, idx, flat[:, idx].amax(dim=0) + slack))
    return traps


@pytest.mark.parametrize("conv", [False, True])
def test_the_lagrangian_bound_holds_on_sampled_quiet_points_of_random_toys(conv):
    """Soundness: on random networks with hand-built traps, every sampled quiet point of every box keeps a margin
    at least the certified one, and --check finds nothing; the bound is never below the caps' alone."""
    generator = torch.Generator().manual_seed(1)
    gained, tried = 0, 0
    for seed in range(4):
        gm = trace(_random_net(seed, conv))
        shape = (1, 6, 6) if conv else (4,)
        x = torch.rand((24,) + shape, generator=generator)
        with torch.no_grad():
            y = gm(x).argmax(1)
        traps = _traps_near_natural(gm, x, 3, 0.05, generator)
        for eps in (0.15, 0.3):
            base = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), bounds="crown", lagrangian_steps=0)
            r = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), bounds="crown", lagrangian_steps=15)
            assert bool((r["margin_detect"] >= base["margin_detect"] - 1e-6).all())
            assert bool((r["detect_or_robust"] >= base["detect_or_robust"]).all())
            gained += int((r["margin_detect"] > base["margin_detect"] + 1e-6).sum())
            tried += int((~base["detect_or_robust"]).sum())
            # sampled quiet points of each box
            lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
            u = torch.rand((x.shape[0], 300) + shape, generator=generator)
            u[:, :100] = (u[:, :100] < 0.5).float()               # vertices
            points = (lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)).reshape((-1,) + shape)
            with torch.no_grad():
                logits, values = run_recorded(gm, points, [t.node for t in traps])
            quiet = torch.ones(points.shape[0], dtype=torch.bool)
            for t in traps:
                quiet &= ~(values[t.node].flatten(1)[:, t.flat_indices] > t.thresholds).any(dim=1)
            logits = logits.reshape(x.shape[0], 300, -1)
            true = logits.gather(2, y.view(-1, 1, 1).expand(-1, 300, 1)).squeeze(2)
            other = logits.scatter(2, y.view(-1, 1, 1).expand(-1, 300, 1), float("-inf")).amax(dim=2)
            margin = (true - other).masked_fill(~quiet.reshape(x.shape[0], 300), float("inf")).amin(dim=1)
            held = ~r["always_alarm"]
            assert bool((margin[held] >= r["margin_detect"][held] - 1e-5).all())
            check = check_certificates(gm, traps, x, y, eps, (0.0, 1.0), 64, seed=seed, bounds="crown",
                                       lagrangian_steps=15)
            assert check.ok, check.to_dict()
    assert tried > 0 and (gained > 0 or not conv)   # not vacuous: boxes left to certify, and (conv) some gained


def test_constraints_sit_on_the_pre_activation_of_a_relu_trap():
    gm, traps = attack_direction_trap()
    (c,) = lagrangian.constraints(gm, traps, "cpu")
    assert c.node.name != traps[0].node and c.index.tolist() == [1] and c.limit.tolist() == [pytest.approx(0.05)]


@pytest.mark.parametrize("objective", ["lagrangian", "robust-crown"])
def test_the_crown_ibp_objectives_are_differentiable_and_bound_the_capped_margin(objective, tiny_model, digits,
                                                                                one_thread):
    """The training bound (CROWN-IBP, lambda fixed per trap) is a sound margin bound: never above certify's
    crown-ibp figure with the same traps and lambda = 0 optimised further; its hinge reaches the weights and
    (``lagrangian``) the multipliers."""
    import copy

    from harden.graph.trace import trace
    from harden.methods.base import FitContext, MethodSpec, Options
    from harden.methods.ctt import CTTStrict
    from harden.train.finetune import FinetuneConfig, _Traps

    gm = trace(copy.deepcopy(tiny_model))
    sites, masks, _ = CTTStrict().plan(FitContext(gm=gm, data=digits, options=Options(key="dor"),
                                                  settings=MethodSpec.of("ctt-strict", mask_ratio=0.1).settings))
    cfg = FinetuneConfig(kind="strict", eps=0.03, objective=objective, steps=4, eps_warmup=0.0)
    cfg.check()
    x, y = digits.train.x[:64], digits.train.y[:64]
    traps = _Traps(gm, sites, masks, cfg, digits.input_range)
    thresholds = traps.thresholds(digits.train.x)
    traps.objective.refresh(thresholds)
    params = [p for p in gm.parameters()]
    for p in params:
        p.requires_grad_(True)
    ce, l_d, l_c = traps.losses(x, y)
    assert l_c > 0
    l_c.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    rho = traps.objective.rho
    assert (rho.grad is not None and rho.grad.abs().sum() > 0) == (objective == "lagrangian")
    # soundness against sampled quiet points of the boxes
    with torch.no_grad():
        m = traps.objective.crown_margin(x, y, 0.03, traps.objective.caps)
        caps = traps.objective.caps
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            u = torch.rand(x.shape, generator=generator)
            u = torch.where(u < 0.25, torch.zeros_like(u), torch.where(u > 0.75, torch.ones_like(u), u * 2 - 0.5))
            point = (x - 0.03 + 0.06 * u).clamp(*digits.input_range)
            logits, *pre = traps.natural(point)
            quiet = torch.ones(len(x), dtype=torch.bool)
            if caps:
                for name, a, mask in zip(traps.pre, pre, traps.masks):
                    quiet &= ~(a.flatten(1).index_select(1, mask) > caps[name]).any(dim=1)
            margin = logits.gather(1, y.unsqueeze(1)).squeeze(1) - logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
            assert bool((margin[quiet] >= m[quiet] - 1e-4).all())


def test_a_row_that_cannot_reach_zero_is_given_up_and_its_bound_stays_sound(monkeypatch):
    """The hand-built net with its margin scaled by 1e4: over the box it reaches -1e3, and lambda would have to
    reach 1e4 to cancel it (Adam at lr 0.5 moves lambda ~0.5 per step). The row is dropped after DROP_AFTER steps;
    the bound it keeps is sound and above the caps' alone. The unscaled net's row is never dropped (it certifies)."""
    gm, traps = attack_direction_trap()
    with torch.no_grad():
        gm.get_submodule("2").weight.mul_(1e4)
        gm.get_submodule("2").bias.mul_(1e4)
    seen = {}
    original = lagrangian.lagrangian_margin

    def spy(*args, stats=None, **kwargs):
        stats = {} if stats is None else stats
        out = original(*args, stats=stats, **kwargs)
        seen.update(stats)
        return out

    monkeypatch.setattr(lagrangian, "lagrangian_margin", spy)
    capped = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds="crown", lagrangian_steps=0)
    r = certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds="crown")
    assert seen["rows"] == 1 and seen["moved"] == 1 and seen["dropped"] == 1
    true_min = 1e4 * (0.6 - 0.55)   # the margin's minimum over the quiet inputs: x0 <= 0.55
    assert capped["margin_detect"].item() < r["margin_detect"].item() <= true_min
    assert r["detect_or_robust"].tolist() == [False]
    gm, traps = attack_direction_trap()
    certify_samples(gm, traps, X, Y, 0.2, (0.0, 1.0), bounds="crown")
    assert seen["dropped"] == 0
