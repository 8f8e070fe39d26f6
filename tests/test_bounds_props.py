"""Property tests: random small networks, every bound rule in every spelling, sampled points never escape.

Networks are chained from the menu in ``bounds_nets`` (nn.Module, functional,
torch function, tensor method and ATen spellings through torch.export).  For
each network and box:

* eps = 0 gives point intervals equal to the forward pass at every node;
* random points and random vertices of the box never leave any node's interval;
* every node's interval is well formed (lo <= hi).

``test_every_registered_rule_is_exercised`` fails when a rule in BOUND_RULES
is never hit by these tests.  ``HARDEN_BOUNDS_EXAMPLES=1000`` runs a longer search.
"""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harden.bounds import BOUND_RULES, Interval, propagate
from harden.bounds.propagate import input_dependent
from harden.graph.trace import trace

from bounds_nets import BY_STAGE, INPUT_SHAPE, SPELLINGS, build_net, net_for, real_values

RTOL = 1e-5
HIT: set[str] = set()   # canonical keys whose rule ran in this module's tests

# Spellings also run through torch.export, which turns them into other ATen ops (slice/select, rsub,
# reciprocal, div modes, sym_size, dropout, batch_norm...): one export costs ~0.3 s, so a chosen few.
EXPORTED = frozenset({
    "getitem/channels", "getitem/rows", "getitem/select", "getitem/step", "cat/concat", "cat/torch",
    "rsub/torch[img]", "reciprocal/torch[vec]", "div/floor[img]", "div/constant-by-interval[vec]",
    "mean/torch-dim-list", "softmax/functional[vec]", "log_softmax/torch[vec]", "batch_norm/functional-kw",
    "batch_norm/module2d", "identity/dropout-functional[img]", "reshape/view-size", "relu6/hardtanh-module[img]",
    "conv1d/functional", "max_pool2d/functional-ceil", "avg_pool2d/functional", "adaptive_avg_pool2d/module",
    "leaky_relu/negative-slope[vec]", "hardtanh/functional-kw[img]", "permute/method", "transpose/torch",
    "layer_norm/module", "scaled_dot_product_attention/functional", "multi_head_attention/module", "chunk/method",
    "hardsigmoid/module[img]", "adaptive_max_pool2d/module",
})


def _checked(gm) -> list[str]:
    dependent = input_dependent(gm)
    return [n.name for n in gm.graph.nodes if n in dependent and n.op != "output"]


def _tol(iv: Interval) -> torch.Tensor:
    scale = torch.maximum(iv.lo.abs(), iv.hi.abs()).flatten(1)
    scale = torch.nan_to_num(scale, posinf=0.0).amax(dim=1).clamp_min(1.0)
    return (RTOL * scale).reshape((-1,) + (1,) * (iv.lo.dim() - 1))


def _entries(bound, value):
    """(bound, value) pairs of a node: itself, or each item of a tuple-valued node (chunk, attention...)."""
    if isinstance(bound, (tuple, list)) and isinstance(value, (tuple, list)) and len(bound) == len(value):
        return [pair for b, v in zip(bound, value) for pair in _entries(b, v)]
    return [(bound, value)]


def check_graph(gm: fx.GraphModule, x: torch.Tensor, eps: float, input_range, n_points: int, seed: int) -> set[str]:
    """The three properties on one graph and batch; returns the rule keys that ran."""
    names = _checked(gm)
    with torch.no_grad():
        # eps = 0: point intervals equal the forward pass.
        point = propagate(gm, Interval.point(x), record=names)
        real = real_values(gm, x)
        for name in names:
            for iv, v in _entries(point.nodes[name], real[name]):
                if isinstance(iv, Interval):
                    tol = RTOL * max(1.0, float(v.abs().max()) if v.numel() else 1.0)
                    assert torch.allclose(iv.lo, v, rtol=0, atol=tol), f"eps=0 lower bound != forward at {name}"
                    assert torch.allclose(iv.hi, v, rtol=0, atol=tol), f"eps=0 upper bound != forward at {name}"
                elif iv is not None:   # None: a value without bounds (max pooling's indices)
                    assert iv == v or (isinstance(v, torch.Tensor) and torch.equal(iv, v)), name

        box = Interval.from_box(x, eps, input_range)
        bounds = propagate(gm, box, record=names)
        # Nothing recorded: rules may then work in place on bounds nobody else reads; same result,
        # and the caller's box is left alone.
        box_lo, box_hi = box.lo.clone(), box.hi.clone()
        bare = propagate(gm, box).output
        assert torch.equal(bare.lo, bounds.output.lo) and torch.equal(bare.hi, bounds.output.hi)
        assert torch.equal(box.lo, box_lo) and torch.equal(box.hi, box_hi), "propagate wrote into the input box"
        for name in names:
            for iv, _ in _entries(bounds.nodes[name], real[name]):
                if isinstance(iv, Interval):
                    assert bool((iv.lo <= iv.hi + _tol(iv)).all()), f"lo > hi at {name}"
        generator = torch.Generator().manual_seed(seed)
        for k in range(n_points):
            u = torch.rand(x.shape, generator=generator)
            if k < n_points // 3:
                u = (u < 0.5).float()  # a random vertex of the box
            p = box.lo + u * (box.hi - box.lo)
            values = real_values(gm, p)
            for name in names:
                for iv, v in _entries(bounds.nodes[name], values[name]):
                    if not isinstance(iv, Interval):
                        continue
                    tol = _tol(iv)
                    below, above = (iv.lo - tol - v).max(), (v - iv.hi - tol).max()
                    assert below <= 0 and above <= 0, (f"point {k} escapes the bounds at node {name}: below by "
                                                       f"{float(below):.3g}, above by {float(above):.3g}")
    with torch.enable_grad():  # with autograd on, nothing runs in place: the same bounds up to rounding
        graded = propagate(gm, box).output
    tol = _tol(bounds.output)
    assert bool(((graded.lo - bounds.output.lo).abs() <= tol).all() and ((graded.hi - bounds.output.hi).abs() <= tol).all())
    HIT.update(bounds.rules | point.rules)
    return bounds.rules | point.rules


def _export(model: torch.nn.Module, x: torch.Tensor) -> fx.GraphModule:
    batch = torch.export.Dim("batch", min=2)
    return trace(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module())


def _inputs(input_range, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) + INPUT_SHAPE[1:]
    return torch.rand(shape, generator=g) if input_range else torch.randn(shape, generator=g)


# --------------------------------------------------------------------------- every spelling alone
@functools.lru_cache(maxsize=None)
def _run_spelling(name: str, exported: bool) -> frozenset:
    spec = next(s for s in SPELLINGS if s.name == name)
    model = net_for(spec, seed=len(name))
    x = _inputs((0.0, 1.0), 3, seed=len(name))
    gm = _export(model, x) if exported else trace(model)
    return frozenset(check_graph(gm, x, 0.2, (0.0, 1.0), n_points=6, seed=1))


def _wants_export(name: str) -> bool:
    return name in EXPORTED


@pytest.mark.parametrize("spec", SPELLINGS, ids=[s.name for s in SPELLINGS])
def test_every_spelling_is_sound_and_hits_its_rules(spec):
    keys = _run_spelling(spec.name, False)
    assert set(spec.keys) <= keys, f"{spec.name} did not reach rules {set(spec.keys) - keys}"
    if _wants_export(spec.name):
        _run_spelling(spec.name, True)


# --------------------------------------------------------------------------- random networks
def _chains(draw_stage_len):
    return st.tuples(
        st.lists(st.sampled_from(BY_STAGE["img"]), min_size=0, max_size=5),
        st.sampled_from(BY_STAGE["img->vec"]),
        st.lists(st.sampled_from(BY_STAGE["vec"]), min_size=0, max_size=draw_stage_len),
    )


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=int(os.environ.get("HARDEN_BOUNDS_EXAMPLES", 30)), **COMMON)
@given(chain=_chains(4), seed=st.integers(0, 2**16), eps=st.sampled_from([0.0, 1e-3, 0.05, 0.3]),
       bounded=st.booleans(), batch=st.integers(1, 4))
def test_random_networks_are_sound(chain, seed, eps, bounded, batch):
    img, flat, vec = chain
    model = build_net([*img, flat, *vec], random.Random(seed))
    input_range = (0.0, 1.0) if bounded else None
    x = _inputs(input_range, batch, seed)
    check_graph(trace(model), x, eps, input_range, n_points=5, seed=seed)


@settings(max_examples=max(1, int(os.environ.get("HARDEN_BOUNDS_EXAMPLES", 30)) // 8), **COMMON)
@given(chain=_chains(3), seed=st.integers(0, 2**16), eps=st.sampled_from([0.01, 0.2]))
def test_random_exported_networks_are_sound(chain, seed, eps):
    img, flat, vec = chain
    model = build_net([*img, flat, *vec], random.Random(seed))
    x = _inputs((0.0, 1.0), 3, seed)
    check_graph(_export(model, x), x, eps, (0.0, 1.0), n_points=4, seed=seed)


def test_exported_spellings_exist():
    assert EXPORTED <= {s.name for s in SPELLINGS}


def test_every_registered_rule_is_exercised():
    """Collect the keys the property tests hit; any registered rule never hit is a gap in the tests."""
    for spec in SPELLINGS:  # cached: free when the parametrized sweep already ran
        HIT.update(_run_spelling(spec.name, False))
        if _wants_export(spec.name):
            HIT.update(_run_spelling(spec.name, True))
    missing = sorted(set(BOUND_RULES.names()) - HIT)
    assert not missing, f"bound rules never exercised by the property tests: {missing}"
