"""The flow-field threat: warp (Eq. 4), TV (Eq. 6), the exact per-pixel box and the TV relaxation, by sampling."""

import itertools

import pytest
import torch
import torch.nn as nn

from harden.bounds.flow_box import flow_box, pixel_range, translate
from harden.bounds.flow_tv import first_affine_layers, iso, layer_bounds, stray_counts
from harden.certification.flow import FlowThreat, parse_threat, sample_flows
from harden.core.flow import project, total_variation, warp
from harden.errors import HardenError
from harden.graph.trace import trace


def _images(n=3, c=2, h=7, w=9, seed=0):
    return torch.rand((n, c, h, w), generator=torch.Generator().manual_seed(seed))


def _random_flows(n, h, w, delta, tv, generator, count):
    """Flows of many kinds inside the budget (the threat's own sampler plus independent draws)."""
    yield from sample_flows(n, h, w, count, delta, tv, generator).unbind(1)
    for _ in range(count):
        raw = (torch.rand((n, 2, h, w), generator=generator) * 2 - 1) * delta
        yield project(raw, delta, tv)
        yield project(torch.sign(raw) * delta, delta, tv)


def test_warp_reads_the_image_at_each_pixel_plus_its_flow():
    x = _images()
    assert torch.allclose(warp(x, torch.zeros(3, 2, 7, 9)), x)
    for a, b in [(0.3, -0.7), (1.5, 2.2), (-3.1, 0.0), (10.0, -10.0)]:
        flow = torch.zeros(3, 2, 7, 9)
        flow[:, 0], flow[:, 1] = a, b
        assert torch.allclose(warp(x, flow), translate(x, a, b), atol=1e-6)
    one = torch.zeros(3, 2, 7, 9)
    one[:, 1] = 1.0   # everything reads its right neighbour; the last column reads the border
    moved = warp(x, one)
    assert torch.allclose(moved[..., :-1], x[..., 1:], atol=1e-6) and torch.allclose(moved[..., -1], x[..., -1])


def test_total_variation_is_eq_6_and_project_meets_both_budgets():
    assert float(total_variation(torch.ones(1, 2, 4, 4))) == 0.0
    single = torch.zeros(1, 2, 4, 4)
    single[0, 0, 1, 1] = 1.0          # four edges, each counted from both ends
    assert float(total_variation(single)) == pytest.approx(8.0)
    flow = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 3
    inside = project(flow, delta=0.7, tv=4.0)
    assert float(inside.abs().max()) <= 0.7
    assert bool((total_variation(inside) <= 4.0).all())


@pytest.mark.parametrize("delta", [0.3, 1.0, 1.6])
def test_the_flow_box_contains_every_sampled_interpolation(delta):
    x = _images()
    box = flow_box(x, delta)
    generator = torch.Generator().manual_seed(2)
    for flow in _random_flows(3, 7, 9, delta, None, generator, 24):
        moved = warp(x, flow)
        assert bool(box.contains(moved).all())


def test_the_flow_box_is_reached_by_translations():
    """Exact, not only sound: each pixel's ends are values some flow in the budget gives."""
    x = _images(n=1, c=1)
    box = flow_box(x, 0.8)
    seen = torch.stack([translate(x, a, b) for a in (-0.8, 0.0, 0.8) for b in (-0.8, 0.0, 0.8)])
    assert torch.allclose(box.lo, seen.amin(0), atol=1e-5) and torch.allclose(box.hi, seen.amax(0), atol=1e-5)


def test_iso_is_a_lower_bound_of_every_set_boundary():
    h, w = 3, 4
    for mask in range(1 << (h * w)):
        cells = {(i // w, i % w) for i in range(h * w) if mask >> i & 1}
        if len(cells) > h * w // 2:
            continue
        boundary = sum(1 for (r, c) in cells for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                       if 0 <= r + dr < h and 0 <= c + dc < w and (r + dr, c + dc) not in cells)
        assert boundary >= iso(len(cells), h, w)


def test_stray_counts_hold_for_flows_within_the_tv_budget():
    """At most K(s) pixels stray farther than s from the median translation, for flows with TV <= tv."""
    h = w = 10
    tv, levels = 6.0, [0.1, 0.25, 0.5]
    counts = stray_counts(levels, tv, h, w)
    assert counts[0] >= counts[1] >= counts[2]
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        flow = torch.zeros(1, 2, h, w)
        side = 1 + trial % 5                                   # a displaced square: the cheapest way to stray
        r0, c0 = (int(v) for v in torch.randint(0, h - side + 1, (2,), generator=generator))
        flow[0, trial % 2, r0:r0 + side, c0:c0 + side] = float(torch.rand(1, generator=generator)) * 2
        flow = flow + (torch.rand((1, 2, 1, 1), generator=generator) - 0.5)
        if trial % 3 == 0:
            flow = flow + torch.randn((1, 2, h, w), generator=generator) * 0.05
        flow = project(flow, None, tv)
        median = flow.flatten(2).median(dim=2).values.view(1, 2, 1, 1)
        stray = (flow - median).abs().amax(1)
        for s, k in zip(levels, counts):
            assert int((stray > s).sum()) <= k


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_tv_relaxed_first_layer_bounds_contain_every_sampled_flow(kind):
    torch.manual_seed(0)
    h = w = 10
    if kind == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * h * w, 12), nn.ReLU(), nn.Linear(12, 3))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, 3))
    gm = trace(model.eval())
    layers = first_affine_layers(gm, (2, h, w))
    assert len(layers) == 1
    x = _images(n=2, h=h, w=w, seed=4)
    delta, tv = 1.0, 3.0
    bounds = layer_bounds(layers[0], x, delta, tv, cells=3)
    assert bounds is not None
    first = model[1] if kind == "linear" else model[0]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for flow in _random_flows(2, h, w, delta, tv, generator, 12):
            moved = warp(x, flow)
            out = first(moved.flatten(1) if kind == "linear" else moved)
            assert bool(bounds.contains(out, tol=1e-4).all())


def test_tv_relaxation_narrows_the_first_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 12 * 12, 20), nn.ReLU(), nn.Linear(20, 3))
    gm = trace(model.eval())
    layer = first_affine_layers(gm, (2, 12, 12))[0]
    x = _images(n=2, h=12, w=12, seed=6)
    from harden.bounds.propagate import propagate

    with torch.no_grad():
        plain = propagate(gm, flow_box(x, 1.0), record={layer.node}).nodes[layer.node]
        relaxed = layer_bounds(layer, x, 1.0, 3.0, cells=4)
    narrowed = torch.minimum(plain.hi, relaxed.hi) - torch.maximum(plain.lo, relaxed.lo)
    assert float(narrowed.mean()) < 0.9 * float(plain.width.mean())


def test_parse_threat():
    assert parse_threat("linf") is None
    t = parse_threat("flow:delta=0.5,tv=7")
    assert (t.delta, t.tv) == (0.5, 7.0) and t.label() == "flow:delta=0.5,tv=7"
    assert parse_threat("flow:delta=1").tv is None
    for bad in ("flow", "flow:tv=7", "flow:delta=x", "flow:delta=-1", "flow:speed=2", "l2", "flow:delta=1,delta=2"):
        with pytest.raises(HardenError):
            parse_threat(bad)
    with pytest.raises(HardenError):
        FlowThreat(float("inf"))


def test_flow_box_refuses_a_bad_budget():
    with pytest.raises(HardenError):
        flow_box(_images(), -0.1)
    with pytest.raises(HardenError):
        pixel_range(torch.zeros(2, 3), (0, 1), (0, 1))


def test_sampled_flows_stay_inside_the_budget():
    flows = sample_flows(3, 8, 8, 20, 0.6, 2.5, torch.Generator().manual_seed(0))
    assert float(flows.abs().max()) <= 0.6 + 1e-6
    tvs = total_variation(flows.reshape(-1, 2, 8, 8))
    assert bool((tvs <= 2.5 + 1e-5).all())
    assert torch.equal(flows[:, 0], torch.zeros_like(flows[:, 0]))   # the sample itself comes first
    for combo in itertools.product((0.6, -0.6), repeat=2):
        assert any(torch.all(flows[0, i, 0] == combo[0]) and torch.all(flows[0, i, 1] == combo[1]) for i in range(5))
