"""Backward linear-relaxation bounds (harden.bounds.crown): hand-computed references, soundness by sampling
on random small networks for every backward rule, never looser than interval bounds."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harden.bounds import Interval, propagate
from harden.bounds.backward import BACKWARD_RULES
from harden.bounds.crown import LinearBounds, check_method
from harden.bounds.margin import final_linear as _final_linear
from harden.certification.certify import margin_lower_bound
from harden.errors import HardenError, UnsupportedOpsError
from harden.graph.trace import trace

from bounds_nets import BY_NAME, BY_STAGE, CLASSES, INPUT_SHAPE, SPELLINGS, build_net, net_for, real_values

RTOL = 1e-5
HIT: set[str] = set()
WITH_RULES = set(BACKWARD_RULES.names()) | {"size", "getattr"}


REFUSED = {f"{name}[{stage}]" for stage in ("img", "vec")
           for name in ("div/floor", "mul/interval-interval", "mul/interval-interval-signed", "div/by-interval",
                        "div/constant-by-interval")} | {"matmul/interval-interval"}
"""Spellings whose key has a backward rule but whose variant has none (rounding, a product or quotient of two
input-dependent values): bounded by their interval."""


def _relaxed(spec) -> bool:
    """Every op of the spelling has a relaxation; the others are bounded by their intervals in the passes."""
    return set(spec.keys) <= WITH_RULES and spec.name not in REFUSED


CROWN_SPELLINGS = SPELLINGS   # every op with an interval rule, relaxed or not
CROWN_STAGE = BY_STAGE


# --------------------------------------------------------------------------- by hand
def _hand_net() -> nn.Module:
    """h = relu([x, x - 0.5]), logits = [h1 - h2, 0]: on x in [-1, 2] the true logit 0 lies in [0, 0.5]."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        net[2].bias.zero_()
    return net.eval()


def test_two_layer_reference_by_hand():
    """z1 = x in [-1, 2]: u > -l, lower slope 1; upper chord (2/3) (z + 1).  z2 = x - 0.5 in [-1.5, 1.5]: u = -l,
    lower slope 0; upper chord 0.5 z2 + 0.75.  Lower bound of h1 - h2 >= x - (0.5 (x - 0.5) + 0.75)
    = 0.5 x - 0.5 >= -1 at x = -1 (intervals: 0 - 1.5 = -1.5).  Upper: -h1 + h2 >= -(2/3)(x + 1) >= -2."""
    gm = trace(_hand_net())
    box = Interval(torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    engine = LinearBounds(gm)
    assert engine.refined == {}  # the first layer's interval bounds are exact: nothing to refine
    y = torch.tensor([0])
    for method in ("crown-ibp", "crown"):
        result = engine.bound_graph(box, method)
        margin = engine.margin_lower(result.nodes, y, _final_linear(gm))
        assert torch.allclose(margin, torch.tensor([-1.0]), atol=1e-6)
        logits = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        both = engine.neuron_lower(result.nodes, logits, torch.tensor([0, 0]), torch.tensor([0, 0]),
                                   torch.tensor([1.0, -1.0]))
        assert torch.allclose(both, torch.tensor([-1.0, -2.0]), atol=1e-6)   # logit 0 in [-1, 2]
    ibp = propagate(gm, box, record={n.name for n in gm.graph.nodes})
    folded = margin_lower_bound(gm, ibp, y, _final_linear(gm))
    assert torch.allclose(folded, torch.tensor([-1.5]), atol=1e-6)


def test_refinement_by_hand():
    """A second hidden layer: its input is refined by a backward pass and beats intervals.
    g = relu(h1 - h2) with h as above: intervals give h1 - h2 in [-1.5, 2], the backward pass [-1, 2]."""
    net = nn.Sequential(*_hand_net()[:2], nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.zero_()
        net[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[4].bias.zero_()
    gm = trace(net.eval())
    engine = LinearBounds(gm)
    hidden = next(n.name for n in gm.graph.nodes if n.target == "2")   # the second linear layer
    assert list(engine.refined) == [hidden]
    box = Interval(torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    refined = engine.bound_graph(box, "crown").nodes[hidden]
    plain = engine.bound_graph(box, "crown-ibp").nodes[hidden]
    assert torch.allclose(plain.lo, torch.tensor([[-1.5]])) and torch.allclose(plain.hi, torch.tensor([[2.0]]))
    assert torch.allclose(refined.lo, torch.tensor([[-1.0]]), atol=1e-6)
    assert torch.allclose(refined.hi, torch.tensor([[2.0]]), atol=1e-6)


def test_unknown_methods_and_ops_without_interval_rules_are_refused():
    with pytest.raises(HardenError, match="crown-ibp"):
        check_method("deeppoly")

    class Erf(nn.Module):   # no interval rule: nothing could stand in for a relaxation
        def forward(self, x):
            return torch.erf(x)

    with pytest.raises(UnsupportedOpsError, match="erf"):
        LinearBounds(trace(Erf()))


def test_ops_without_a_relaxation_are_bounded_by_their_intervals():
    """A softplus has no backward rule and a product of two input-dependent values is refused by mul's: the
    passes stop there on the node's interval (sound, looser) and say so in ``interval_only``; the sigmoid
    gate itself is relaxed."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.mid, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h, gate = torch.relu(self.a(x)), torch.sigmoid(self.b(x))
            return self.out(torch.relu(self.mid(torch.relu(h * gate) + gate + F.softplus(h))))

    torch.manual_seed(0)
    gm = trace(Gated().eval())
    x = torch.rand(5, 4)
    keys = check_crown(gm, x, 0.05, (0.0, 1.0), n_points=12, seed=4)
    assert {"interval:softplus", "interval:mul"} <= keys and {"linear", "sigmoid"} <= keys, sorted(keys)
    engine = LinearBounds(gm)
    box = Interval.from_box(x, 0.05, (0.0, 1.0))
    y = gm(x).argmax(1)
    with torch.no_grad():
        crown = engine.margin_lower(engine.bound_graph(box, "crown").nodes, y, _final_linear(gm))
        ibp = margin_lower_bound(gm, propagate(gm, box, record=[n.name for n in gm.graph.nodes]), y, _final_linear(gm))
    assert bool((crown >= ibp - 1e-6).all()) and bool((crown > ibp + 1e-6).any())   # still tighter than intervals


# --------------------------------------------------------------------------- sampling
def _tol(iv: Interval) -> torch.Tensor:
    scale = torch.maximum(iv.lo.abs(), iv.hi.abs()).flatten(1)
    scale = torch.nan_to_num(scale, posinf=0.0).amax(dim=1).clamp_min(1.0)
    return (RTOL * scale).reshape((-1,) + (1,) * (iv.lo.dim() - 1))


def _true_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return logits.gather(1, y.unsqueeze(1)).squeeze(1) - others.amax(dim=1)


def check_crown(gm, x: torch.Tensor, eps: float, input_range, n_points: int, seed: int) -> set[str]:
    """For crown-ibp and crown: every node's interval holds the sampled values and lies inside the interval
    one; the margin lower bound (folded and unfolded) holds on every point; eps = 0 is exact.  Returns the
    op keys the passes relaxed, and ``interval:<key>`` for those they bounded by their interval."""
    engine = LinearBounds(gm)
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (x.shape[0],), generator=generator)
    fold = _final_linear(gm)
    box = Interval.from_box(x, eps, input_range)
    names = [n.name for n in gm.graph.nodes]
    with torch.no_grad():
        ibp = propagate(gm, box, record=names)
        exact = engine.bound_graph(Interval.point(x), "crown")
        point_margin = engine.margin_lower(exact.nodes, y, fold)
        truth = _true_margin(gm(x), y)
        assert torch.allclose(point_margin, truth, atol=1e-4 * max(1.0, float(truth.abs().max()))), \
            "eps = 0: the backward pass does not reproduce the forward margin"
        points = [box.lo + (torch.rand(x.shape, generator=generator) < 0.5).float() * (box.hi - box.lo)
                  if k < n_points // 3 else box.lo + torch.rand(x.shape, generator=generator) * (box.hi - box.lo)
                  for k in range(n_points)]
        reals = [real_values(gm, p) for p in points]
        for method in ("crown-ibp", "crown"):
            result = engine.bound_graph(box, method)
            margins = [engine.margin_lower(result.nodes, y, f) for f in {fold, None}]
            for name in names:
                iv, ref = result.nodes.get(name), ibp.nodes.get(name)
                if not isinstance(iv, Interval):
                    continue
                tol = _tol(ref)
                assert bool((iv.lo >= ref.lo - tol).all() and (iv.hi <= ref.hi + tol).all()), \
                    f"{method}: looser than intervals at {name}"
                for k, values in enumerate(reals):
                    v = values[name]
                    assert bool((v >= iv.lo - _tol(iv)).all() and (v <= iv.hi + _tol(iv)).all()), \
                        f"{method}: point {k} escapes the bounds at node {name}"
            for values, p in zip(reals, points):
                real_margin = _true_margin(gm(p), y)
                for m in margins:
                    slack = 1e-4 * real_margin.abs().clamp_min(1.0)
                    assert bool((real_margin >= m - slack).all()), f"{method}: margin bound violated"
    HIT.update(engine.rules_used)
    return set(engine.rules_used) | {f"interval:{k}" for k in engine.interval_only}


def _inputs(bounded: bool, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) + INPUT_SHAPE[1:]
    return torch.rand(shape, generator=g) if bounded else torch.randn(shape, generator=g)


@functools.lru_cache(maxsize=None)
def _run_spelling(name: str) -> frozenset:
    spec = BY_NAME[name]
    model = net_for(spec, seed=len(name))
    x = _inputs(True, 3, seed=len(name))
    return frozenset(check_crown(trace(model), x, 0.1, (0.0, 1.0), n_points=6, seed=1))


@pytest.mark.parametrize("spec", CROWN_SPELLINGS, ids=[s.name for s in CROWN_SPELLINGS])
def test_every_spelling_is_sound(spec):
    keys = _run_spelling(spec.name)
    wanted = set(spec.keys) - {"size", "getattr"}
    if _relaxed(spec):
        assert wanted <= keys, f"{spec.name} did not reach {wanted - keys}"
        assert not any(k.startswith("interval:") for k in keys), f"{spec.name}: {sorted(keys)}"
    else:   # the op without a relaxation was reached, and bounded by its interval
        assert any(k.startswith("interval:") for k in keys), f"{spec.name}: {sorted(keys)}"


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=int(os.environ.get("HARDEN_BOUNDS_EXAMPLES", 8)), **COMMON)
@given(img=st.lists(st.sampled_from(CROWN_STAGE["img"]), min_size=0, max_size=4),
       flat=st.sampled_from(CROWN_STAGE["img->vec"]),
       vec=st.lists(st.sampled_from(CROWN_STAGE["vec"]), min_size=0, max_size=4),
       seed=st.integers(0, 2**16), eps=st.sampled_from([1e-3, 0.05, 0.3]), bounded=st.booleans(),
       batch=st.integers(1, 3))
def test_random_networks_are_sound(img, flat, vec, seed, eps, bounded, batch):
    model = build_net([*img, flat, *vec], random.Random(seed))
    x = _inputs(bounded, batch, seed)
    check_crown(trace(model), x, eps, (0.0, 1.0) if bounded else None, n_points=5, seed=seed)


EXPORTED = ("getitem/channels", "getitem/rows", "getitem/select", "getitem/step", "cat/torch", "rsub/torch[img]",
            "reshape/view-size", "conv1d/functional", "max_pool2d/functional-ceil", "chunk/method",
            "multi_head_attention/module", "adaptive_max_pool2d/module")


@functools.lru_cache(maxsize=None)
def _run_exported(name: str) -> frozenset:
    """The ATen spellings of torch.export graphs (slice / select / rsub / view...)."""
    model = net_for(BY_NAME[name], seed=len(name))
    x = _inputs(True, 3, seed=len(name))
    gm = trace(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},)).module())
    return frozenset(check_crown(gm, x, 0.1, (0.0, 1.0), n_points=4, seed=2))


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_spellings_are_sound(name):
    assert _run_exported(name)


def test_every_backward_rule_is_exercised():
    for spec in CROWN_SPELLINGS:
        HIT.update(_run_spelling(spec.name))
    for name in EXPORTED:
        HIT.update(_run_exported(name))
    missing = sorted(set(BACKWARD_RULES.names()) - HIT)
    assert not missing, f"backward rules never exercised: {missing}"


def test_crown_tightens_a_trained_lenet_style_net():
    """On a ReLU conv net with max pooling, crown is at least as tight as crown-ibp, which is at least as
    tight as intervals, on every sample's margin; and it is strictly tighter on average."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    gm = trace(net)
    x = torch.rand(8, 1, 8, 8)
    y = gm(x).argmax(1)
    fold = _final_linear(gm)
    box = Interval.from_box(x, 0.02, (0.0, 1.0))
    engine = LinearBounds(gm)
    with torch.no_grad():
        ibp = margin_lower_bound(gm, propagate(gm, box, record={n.name for n in fold.all_input_nodes}), y, fold)
        cibp = engine.bound_graph(box, "crown-ibp")
        crown = engine.bound_graph(box, "crown")
        m_cibp = engine.margin_lower(cibp.nodes, y, fold)
        m_crown = engine.margin_lower(crown.nodes, y, fold)
    assert float(m_crown.mean()) > float(ibp.mean())
    assert float(m_cibp.mean()) > float(ibp.mean())
    assert float(m_crown.mean()) >= float(m_cibp.mean()) - 1e-6


@settings(max_examples=8, **COMMON)
@given(seed=st.integers(0, 2**16), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]),
       pool=st.sampled_from([(2, 2, 0), (3, 2, 1), (2, 1, 0)]), eps=st.sampled_from([0.02, 0.1]))
def test_windowed_passes_equal_dense_passes(seed, stride, padding, pool, eps):
    """Conv neurons above a conv / ReLU / max-pool chain are refined on windows; the bounds must be the
    dense pass's (same relaxations), whatever the strides, paddings and pooling geometry."""
    torch.manual_seed(seed)
    k, s, p = pool
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=padding), nn.ReLU(), nn.MaxPool2d(k, s, p),
                        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(3, 2, 12, 12)
    net(x)
    gm = trace(net.eval())
    box = Interval.from_box(x, eps, (0.0, 1.0))
    results = []
    with torch.no_grad():
        for windowed in (True, False):
            engine = LinearBounds(gm)
            engine.windowed = windowed
            results.append(engine.bound_graph(box, "crown"))
            # candidate rows go the windowed way when enabled, none when not (a net whose conv neurons all settle
            # without refinement has no candidates: then both runs are the same code)
            if windowed:
                assert (engine.windowed_rows > 0) == (engine.chain_rows > 0)
                assert engine.windowed_rows <= engine.chain_rows
            else:
                assert engine.windowed_rows == 0
    for name, iv in results[0].nodes.items():
        if isinstance(iv, Interval):
            other = results[1].nodes[name]
            tol = 1e-5 * max(1.0, float(other.hi.abs().max()))
            assert torch.allclose(iv.lo, other.lo, atol=tol) and torch.allclose(iv.hi, other.hi, atol=tol), name


def test_reflect_padding_is_sound():
    """A convolution with padding_mode='reflect' (padding copies entries) in the middle of a net."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"),
                        nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, CLASSES)).eval()
    check_crown(trace(net), _inputs(True, 2, seed=3), 0.05, (0.0, 1.0), n_points=6, seed=3)


def _lenet_like(seed: int) -> nn.Module:
    """conv - ReLU - max pool (non-overlapping) twice, then dense layers: the shape the fused and whole-map
    windowed steps and the max-pool read filter are written for."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 12), nn.ReLU(),
                         nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def _assert_same_bounds(a, margin_a, b, margin_b, names) -> None:
    """Two runs' margins agree, and so do their bounds at ``names`` (nodes without an interval skipped)."""
    assert torch.allclose(margin_a, margin_b, atol=1e-5 * max(1.0, float(margin_b.abs().max())))
    for name in names:
        iv = a.nodes.get(name)
        if isinstance(iv, Interval):
            tol = 1e-5 * max(1.0, float(b.nodes[name].hi.abs().max()))
            assert torch.allclose(iv.lo, b.nodes[name].lo, atol=tol), name
            assert torch.allclose(iv.hi, b.nodes[name].hi, atol=tol), name


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_and_whole_map_windows_equal_dense_passes(seed):
    """A ReLU under a non-overlapping pool relaxed inside the pool step, and dense rows after a flatten
    through the windowed steps: every node bound and the margin equal the dense passes'."""
    gm = trace(_lenet_like(seed))
    x = torch.rand(4, 1, 12, 12)
    box = Interval.from_box(x, 0.03, (0.0, 1.0))
    y = gm(x).argmax(1)
    out = []
    with torch.no_grad():
        for windowed in (True, False):
            engine = LinearBounds(gm)
            engine.windowed = windowed
            result = engine.bound_graph(box, "crown")
            out.append((result, engine.margin_lower(result.nodes, y, _final_linear(gm))))
            # candidate rows go the windowed way when enabled, none when not (a net whose conv neurons all settle
            # without refinement has no candidates: then both runs are the same code)
            if windowed:
                assert (engine.windowed_rows > 0) == (engine.chain_rows > 0)
                assert engine.windowed_rows <= engine.chain_rows
            else:
                assert engine.windowed_rows == 0
    (fast, m_fast), (dense, m_dense) = out
    _assert_same_bounds(fast, m_fast, dense, m_dense, list(fast.nodes))


@pytest.mark.parametrize("seed", [0, 1])
def test_skipping_neurons_no_pool_window_reads_changes_nothing_after_the_pool(seed):
    """Conv neurons whose ReLU output no max-pool window can read are not refined: every bound from the
    pool on, and the margin, equal those of refining them all; and fewer neurons are refined."""
    gm = trace(_lenet_like(seed))
    x = torch.rand(6, 1, 12, 12)
    box = Interval.from_box(x, 0.03, (0.0, 1.0))
    y = gm(x).argmax(1)
    conv = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    counts, out = [], []
    with torch.no_grad():
        for filtered in (True, False):
            engine = LinearBounds(gm)
            if not filtered:
                engine._pooled = {}
            iv = propagate(gm, box, record={conv[1].name}).nodes[conv[1].name]
            counts.append(int(engine._mask(conv[1], iv).sum()))
            result = engine.bound_graph(box, "crown")
            out.append((result, engine.margin_lower(result.nodes, y, _final_linear(gm))))
    assert counts[0] < counts[1]
    (kept, m_kept), (full, m_full) = out
    after = [n.name for n in gm.graph.nodes][[n.name for n in gm.graph.nodes].index(conv[1].name) + 2:]
    _assert_same_bounds(kept, m_kept, full, m_full, after)


def test_dense_rows_to_the_input_are_optional_and_never_looser():
    """``dense_to_input`` adds the last stage (to the box) for dense layers: sound, at least as tight."""
    gm = trace(_lenet_like(2))
    x = torch.rand(6, 1, 12, 12)
    check_crown(gm, x, 0.03, (0.0, 1.0), n_points=6, seed=2)
    box = Interval.from_box(x, 0.03, (0.0, 1.0))
    y = gm(x).argmax(1)
    margins = []
    with torch.no_grad():
        for deep in (False, True):
            engine = LinearBounds(gm)
            engine.dense_to_input = deep
            result = engine.bound_graph(box, "crown")
            margins.append(engine.margin_lower(result.nodes, y, _final_linear(gm)))
    assert bool((margins[1] >= margins[0] - 1e-5).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_second_bounds_skipped_only_where_no_relaxation_reads_them(seed):
    """Upper bounds first, lower bounds only for neurons whose ReLU is not dead and whose pool window may read
    them: every bound from the last hidden ReLU on, and the margin, equal refining both bounds of every
    neuron, with fewer rows.  Lower bounds first where the ReLU output feeds only linear layers (skipping the
    upper bound of settled active neurons, which only loosens later interval bounds): still sound."""
    gm = trace(_lenet_like(seed))
    x = torch.rand(8, 1, 12, 12)
    box = Interval.from_box(x, 0.05, (0.0, 1.0))
    y = gm(x).argmax(1)
    rows, out = [], []
    with torch.no_grad():
        for skip in (True, False):
            engine = LinearBounds(gm)
            engine.skip_settled, engine.lower_first = skip, False
            counted = []
            lower = engine.neuron_lower
            engine.neuron_lower = lambda *a, **k: counted.append(a[2].shape[0]) or lower(*a, **k)
            result = engine.bound_graph(box, "crown")
            rows.append(sum(counted))
            out.append((result, engine.margin_lower(result.nodes, y, _final_linear(gm))))
    assert rows[0] < rows[1]
    (kept, m_kept), (full, m_full) = out
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    _assert_same_bounds(kept, m_kept, full, m_full, names[-2:])   # the last ReLU, the logits layer
    check_crown(gm, x, 0.05, (0.0, 1.0), n_points=6, seed=seed)      # the default: lower bounds first


def _stem_net(seed: int) -> nn.Module:
    """A ResNet stem (7x7/2 convolution, batch norm, ReLU, overlapping 3x3/2 max pool) under a convolution and a
    batch norm: the batch norms refined on windows (a batch norm right above a convolution starts a chain)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.Conv2d(5, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.rand(2, 2, 16, 16))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_norm_windows_equal_dense_passes(seed):
    """Batch norms in a window chain and on top of one: every bound and the margin equal the dense passes'."""
    gm = trace(_stem_net(seed))
    x = torch.rand(3, 2, 16, 16)
    box = Interval.from_box(x, 0.02, (0.0, 1.0))
    y = gm(x).argmax(1)
    out, rows = [], []
    with torch.no_grad():
        for windowed in (True, False):
            engine = LinearBounds(gm)
            engine.windowed = windowed
            result = engine.bound_graph(box, "crown")
            out.append((result, engine.margin_lower(result.nodes, y, _final_linear(gm))))
            rows.append(engine.windowed_rows)
    assert rows[0] > 0 and rows[1] == 0
    (fast, m_fast), (dense, m_dense) = out
    _assert_same_bounds(fast, m_fast, dense, m_dense, list(fast.nodes))
    check_crown(gm, x, 0.02, (0.0, 1.0), n_points=6, seed=seed)
