"""Interval bound propagation: the Interval type, single rules checked by hand, errors, gradients, devices."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.bounds import BOUND_RULES, Interval, check_supported, propagate, run_recorded, supported
from harden.errors import HardenError, UnsupportedOpsError
from harden.graph.trace import trace
from harden.core.registry import Registry

aten = torch.ops.aten


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).eval()


# --------------------------------------------------------------------------- Interval
def test_from_box_clips_to_the_input_range():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    box = Interval.from_box(x, 0.1, (0.0, 1.0))
    assert torch.allclose(box.lo, torch.tensor([[0.0, 0.4, 0.9]]))
    assert torch.allclose(box.hi, torch.tensor([[0.1, 0.6, 1.0]]))
    unclipped = Interval.from_box(x, 0.1, None)
    assert torch.allclose(unclipped.lo, x - 0.1)


def test_from_box_takes_a_per_sample_eps():
    x = torch.zeros(2, 3)
    box = Interval.from_box(x, torch.tensor([[0.1], [0.2]]), None)
    assert torch.allclose(box.hi[:, 0], torch.tensor([0.1, 0.2]))


def test_centre_radius_point_intersect():
    iv = Interval(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0]))
    assert torch.equal(iv.centre, torch.tensor([2.0, 0.0]))
    assert torch.equal(iv.radius, torch.tensor([1.0, 2.0]))
    back = Interval.from_centre(iv.centre, iv.radius)
    assert torch.equal(back.lo, iv.lo) and torch.equal(back.hi, iv.hi)
    p = Interval.point(torch.tensor([0.5, 0.5]))
    assert torch.equal(p.lo, p.hi)
    cut = iv.intersect(Interval(torch.tensor([2.0, -5.0]), torch.tensor([9.0, 1.0])))
    assert torch.equal(cut.lo, torch.tensor([2.0, -2.0])) and torch.equal(cut.hi, torch.tensor([3.0, 1.0]))
    empty = iv.intersect(Interval(torch.tensor([4.0, 0.0]), torch.tensor([5.0, 0.0])))
    assert empty.is_empty().tolist() == [True, False]
    assert iv.clamp_upper(0.5).hi.tolist() == [0.5, 0.5]


# --------------------------------------------------------------------------- the registry
def test_every_rule_has_a_one_line_docstring_with_its_math():
    for key in BOUND_RULES.names():
        doc = (BOUND_RULES.get(key).__doc__ or "").strip()
        assert doc and "\n" not in doc, f"rule {key!r} needs a one-line docstring"


def test_registry_refuses_duplicates_and_lists_what_exists_on_a_miss():
    with pytest.raises(ValueError, match="twice"):
        BOUND_RULES.register("relu")(lambda call: None)
    with pytest.raises(HardenError, match="conv2d"):
        BOUND_RULES.get("erf")
    assert isinstance(BOUND_RULES, Registry)


# --------------------------------------------------------------------------- single rules by hand
def _one_op(fn):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    return trace(M())


def _vertices(lo: torch.Tensor, hi: torch.Tensor):
    for bits in itertools.product([0, 1], repeat=lo.numel()):
        b = torch.tensor(bits, dtype=lo.dtype).reshape(lo.shape)
        yield lo + b * (hi - lo)


def test_linear_bounds_are_exact_for_one_layer():
    """For one affine layer interval bounds are attained at vertices of the box: tight, not just sound."""
    torch.manual_seed(1)
    fc = nn.Linear(4, 3)
    gm = trace(nn.Sequential(fc))
    x = torch.rand(1, 4)
    r = propagate(gm, Interval.from_box(x, 0.2, None))
    outs = torch.stack([fc(v) for v in _vertices(x - 0.2, x + 0.2)])
    assert torch.allclose(r.output.lo, outs.amin(0), atol=1e-6)
    assert torch.allclose(r.output.hi, outs.amax(0), atol=1e-6)


def test_batch_norm_is_sign_aware():
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -2.0]))
        bn.bias.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.fill_(1.0 - bn.eps)
    r = propagate(trace(nn.Sequential(bn)), Interval(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])))
    assert torch.allclose(r.output.lo, torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(r.output.hi, torch.tensor([[3.0, 0.0]]))


def test_batch_norm_in_training_mode_is_refused():
    gm = trace(nn.Sequential(nn.BatchNorm1d(2)))
    gm.get_submodule("0").train()
    with pytest.raises(HardenError, match="eval mode"):
        propagate(gm, Interval.point(torch.zeros(2, 2)))


def test_native_batch_norm_tuple_overload():
    """aten._native_batch_norm_legit_no_training returns (out, mean, invstd); getitem 0 takes the bounds."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    root = nn.Module()
    for name, value in dict(w=torch.tensor([1.0, -3.0]), b=torch.tensor([0.5, 0.0]), m=torch.tensor([0.0, 1.0]),
                            v=torch.tensor([1.0, 4.0])).items():
        root.register_buffer(name, value)
    w, b, m, v = (graph.get_attr(n) for n in "wbmv")
    out = graph.call_function(aten._native_batch_norm_legit_no_training.default, (x, w, b, m, v, 0.1, 0.0))
    graph.output(graph.call_function(__import__("operator").getitem, (out, 0)))
    gm = fx.GraphModule(root, graph)
    r = propagate(gm, Interval(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 3.0]])))
    assert torch.allclose(r.output.lo, torch.tensor([[0.5, -3.0]]))
    assert torch.allclose(r.output.hi, torch.tensor([[1.5, 1.5]]))


def test_leaky_relu_with_negative_slope_dips_to_zero():
    gm = _one_op(lambda x: F.leaky_relu(x, -0.5))
    r = propagate(gm, Interval(torch.tensor([[-2.0, 1.0, -4.0]]), torch.tensor([[1.0, 2.0, -2.0]])))
    assert r.output.lo.tolist() == [[0.0, 1.0, 1.0]]
    assert r.output.hi.tolist() == [[1.0, 2.0, 2.0]]


def test_softmax_bounds_hold_at_every_vertex_and_are_attained_per_coordinate():
    gm = _one_op(lambda x: F.softmax(x, dim=1))
    lo, hi = torch.tensor([[0.0, -1.0, 2.0]]), torch.tensor([[1.0, 0.5, 2.5]])
    r = propagate(gm, Interval(lo, hi))
    outs = torch.stack([F.softmax(v, 1) for v in _vertices(lo, hi)])
    assert torch.allclose(r.output.lo, outs.amin(0), atol=1e-6)  # the extremes of softmax_i sit at vertices
    assert torch.allclose(r.output.hi, outs.amax(0), atol=1e-6)


def test_division_by_an_interval_touching_zero_is_unbounded():
    gm = _one_op(lambda x: 1.0 / x)
    r = propagate(gm, Interval(torch.tensor([[-1.0, 0.5]]), torch.tensor([[1.0, 2.0]])))
    assert r.output.lo[0, 0] == -float("inf") and r.output.hi[0, 0] == float("inf")
    assert torch.allclose(r.output.lo[0, 1], torch.tensor(0.5)) and torch.allclose(r.output.hi[0, 1], torch.tensor(2.0))


def test_active_dropout_is_bounded_by_the_hull_of_zero_and_the_rescaled_input():
    gm = _one_op(lambda x: F.dropout(x, 0.5, True))
    box = Interval(torch.tensor([[-1.0, 1.0]]), torch.tensor([[2.0, 3.0]]))
    r = propagate(gm, box)
    assert r.output.lo.tolist() == [[-2.0, 0.0]] and r.output.hi.tolist() == [[4.0, 6.0]]
    for _ in range(20):
        v = gm(box.lo + torch.rand(1, 2) * box.width)
        assert bool(((v >= r.output.lo) & (v <= r.output.hi)).all())


def test_cat_with_a_constant_part_from_torch_export():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor([[7.0, 8.0]]))

        def forward(self, x):
            return torch.cat([x, self.c.expand(x.shape[0], 2)], dim=1)

    x = torch.zeros(3, 2)
    gm = trace(torch.export.export(M(), (x,)).module())
    r = propagate(gm, Interval.from_box(x, 1.0, None))
    assert r.output.lo[:, 2:].tolist() == [[7.0, 8.0]] * 3 and r.output.hi[:, :2].tolist() == [[1.0, 1.0]] * 3


def test_constant_subgraphs_need_no_rule():
    class M(nn.Module):
        def forward(self, x):
            bias = torch.exp(torch.ones(3))  # depends on nothing: runs as in the model
            return x + bias

    gm = trace(M())
    assert supported(gm) == []
    r = propagate(gm, Interval.point(torch.zeros(2, 3)))
    assert torch.allclose(r.output.lo, torch.full((2, 3), torch.e))


# --------------------------------------------------------------------------- unsupported ops
class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.shrink = nn.Softshrink()

    def forward(self, x):
        x = torch.erf(self.fc(x))
        x = self.shrink(x)
        x = torch.relu(x) + x.abs()
        return torch.exp(x)


def test_unsupported_ops_are_all_listed_at_once():
    gm = trace(ManyUnsupported())
    problems = supported(gm)
    assert [p[0] for p in problems] == ["erf", "shrink", "abs_1", "exp"]
    assert problems[1][1] == "Softshrink"
    with pytest.raises(UnsupportedOpsError) as info:
        propagate(gm, Interval.point(torch.zeros(1, 4)))
    message = str(info.value)
    for name in ("erf", "shrink", "abs_1", "exp"):
        assert name in message
    assert "4 unsupported" in message and "Supported: adaptive_avg_pool2d" in message
    with pytest.raises(UnsupportedOpsError):
        check_supported(gm)


def test_unsupported_ops_in_an_exported_graph_are_listed_too():
    x = torch.zeros(2, 4)
    gm = trace(torch.export.export(ManyUnsupported(), (x,)).module())
    names = [p[1] for p in supported(gm)]
    assert len(names) == 4 and any("erf" in n for n in names) and any("softshrink" in n for n in names)


def test_a_failing_rule_names_the_node():
    class M(nn.Module):
        def forward(self, x):
            return x.view(torch.float16)

    gm = trace(M())
    with pytest.raises(HardenError, match="view"):
        propagate(gm, Interval.point(torch.zeros(1, 4)))


def test_an_unknown_keyword_is_refused_rather_than_ignored():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(F.hardtanh, (x,), {"min_val": 0.0, "max_value": 1.0}))
    gm = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(HardenError, match="unexpected keyword 'max_value'"):
        propagate(gm, Interval.point(torch.zeros(1, 2)))


def test_unknown_record_name_is_an_error():
    with pytest.raises(HardenError, match="nope"):
        propagate(trace(lenet()), Interval.point(torch.zeros(1, 1, 28, 28)), record={"nope"})


# --------------------------------------------------------------------------- record, clamp, batching
def test_record_and_clamp():
    gm = trace(lenet())
    x = torch.rand(5, 1, 28, 28)
    box = Interval.from_box(x, 0.05, (0.0, 1.0))
    site = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    plain = propagate(gm, box, record=set(site))
    assert set(plain.nodes) == set(site)
    capped = propagate(gm, box, record=set(site), clamp={site[-1]: lambda iv: iv.clamp_upper(0.0)})
    assert float(capped.nodes[site[-1]].hi.detach().max()) <= 0.0
    # clamping a set to a subset can only tighten what follows
    assert bool((capped.output.hi <= plain.output.hi + 1e-6).all())
    assert bool((capped.output.lo >= plain.output.lo - 1e-6).all())


def test_batched_bounds_equal_one_sample_at_a_time():
    gm = trace(lenet())
    x = torch.rand(4, 1, 28, 28)
    whole = propagate(gm, Interval.from_box(x, 0.01, (0.0, 1.0))).output
    for i in range(4):
        one = propagate(gm, Interval.from_box(x[i : i + 1], 0.01, (0.0, 1.0))).output
        assert torch.allclose(one.lo, whole.lo[i : i + 1], atol=1e-5)
        assert torch.allclose(one.hi, whole.hi[i : i + 1], atol=1e-5)


def test_in_place_rules_never_touch_the_input_box_or_recorded_bounds():
    """A 1x1 max pool must not hand a view of the box to a sigmoid that may work in place (a bug once)."""
    class M(nn.Module):
        def forward(self, x):
            return torch.sigmoid(torch.max_pool2d(x, 1))[:, 0, 0]

    gm = trace(M())
    box = Interval.from_box(torch.rand(2, 1, 3, 3), 0.1, (0.0, 1.0))
    lo, hi = box.lo.clone(), box.hi.clone()
    with torch.no_grad():
        out = propagate(gm, box).output
    assert torch.equal(box.lo, lo) and torch.equal(box.hi, hi)
    assert torch.allclose(out.lo, torch.sigmoid(lo[:, 0, 0]))


def test_run_recorded_is_the_real_model():
    gm = trace(lenet())
    x = torch.rand(2, 1, 28, 28)
    name = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    out, values = run_recorded(gm, x, {name})
    assert torch.equal(out, gm(x)) and torch.equal(values[name], x)


# --------------------------------------------------------------------------- gradients and devices
def test_gradients_flow_to_the_weights():
    model = lenet()
    gm = trace(model)
    x = torch.rand(3, 1, 28, 28)
    r = propagate(gm, Interval.from_box(x, 0.003, (0.0, 1.0)), record={n.name for n in gm.graph.nodes})
    site = next(n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU))
    # the CTT losses: loose sum(relu(T - hi)) and strict sum(relu(T - lo)) on masked neurons, plus the output
    loss = r.output.hi.sum() + torch.relu(1.0 - r.nodes[site].hi).sum() + torch.relu(1.0 - r.nodes[site].lo).sum()
    loss.backward()
    grads = [p.grad for p in gm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(gm.get_parameter("0.weight").grad.abs().sum()) > 0


def test_gradients_flow_through_every_rule_family():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2).eval()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            x = torch.sigmoid(self.bn(self.conv(x)))
            x = torch.cat([F.avg_pool2d(x, 2), F.adaptive_avg_pool2d(torch.tanh(x) * -2.0, 2)], 1)
            x = torch.flatten(x, 1) / 3.0 - 0.1
            return F.log_softmax(self.fc(F.leaky_relu(x)), 1)

    gm = trace(M())
    r = propagate(gm, Interval.from_box(torch.rand(2, 1, 6, 6), 0.1, (0.0, 1.0)))
    (r.output.hi - r.output.lo).sum().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_no_grad_mode_gives_the_same_bounds():
    gm = trace(lenet())
    box = Interval.from_box(torch.rand(2, 1, 28, 28), 0.01, (0.0, 1.0))
    with_grad = propagate(gm, box).output
    with torch.no_grad():
        without = propagate(gm, box).output
    # (without autograd the rules reuse buffers: c + r, then (c + r) - 2 r, equal up to rounding)
    assert torch.allclose(with_grad.lo.detach(), without.lo, atol=1e-6)
    assert torch.allclose(with_grad.hi.detach(), without.hi, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bounds_follow_the_device_of_the_input():
    gm = trace(lenet()).cuda()
    r = propagate(gm, Interval.from_box(torch.rand(2, 1, 28, 28, device="cuda"), 0.01, (0.0, 1.0)))
    assert r.output.lo.is_cuda and r.output.hi.is_cuda
