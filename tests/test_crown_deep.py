"""crown on deep residual nets: the stage schedule, passes started as single entries, chunks held to the row
budget; soundness by sampling (see test_crown.check_crown)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from harden.bounds import Interval
from harden.bounds.crown import TEMPORARIES, LinearBounds
from harden.bounds.margin import final_linear
from harden.graph.trace import trace

import zoo
from test_crown import _assert_same_bounds, check_crown


def _deep_resnet(seed: int) -> nn.Module:
    """tests/zoo's ResNet with three stages of two basic blocks (stem, 12 block convolutions, 2 downsamples):
    refined nodes up to 14 mixing layers deep, batch norms with drawn statistics."""
    torch.manual_seed(seed)
    net = zoo.ResNet(zoo.BasicBlock, [2, 2, 2], [4, 6, 8], in_channels=1, num_classes=3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed,eps", [(0, 0.002), (1, 0.01)])
def test_deep_residual_nets_are_sound(seed, eps):
    gm = trace(_deep_resnet(seed))
    check_crown(gm, _inputs(3, seed), eps, (0.0, 1.0), n_points=6, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_stage_is_sound_and_later_stages_follow_settling_ones(seed):
    """With ``min_settled = 0`` every stage runs (sound too); with the default and no cheap stages
    (``stage_work = 0``) a node's next stage ran only after one that settled at least that fraction of its
    neurons."""
    gm = trace(_deep_resnet(seed))
    x = _inputs(3, seed)
    box = Interval.from_box(x, 0.004, (0.0, 1.0))
    with torch.no_grad():
        for min_settled in (0.0, LinearBounds(gm).min_settled):
            engine = LinearBounds(gm)
            engine.min_settled, engine.stage_work = min_settled, 0
            engine.bound_graph(box, "crown")
            log = engine.stage_log
            assert log
            for (node, stage, before, after), nxt in zip(log, log[1:] + [None]):
                if nxt is not None and nxt[0] == node and nxt[1] == stage + 1:
                    assert before - after >= min_settled * before
            if min_settled == 0.0:
                ran = {(n, s) for n, s, _, _ in log}
                assert any(s >= 2 for _, s in ran)   # the deep nodes' third stage
        check_crown(gm, x, 0.004, (0.0, 1.0), n_points=4, seed=seed)   # the default (small net: cheap stages run)
    # the schedule itself: d - 2, d - 4, d - 8, ... then 1
    engine = LinearBounds(gm)
    deepest = max(engine.refined, key=lambda n: engine.depth[n])
    node = next(n for n in engine.nodes if n.name == deepest)
    d = engine.depth[deepest]
    depths = [max((engine.depth[n] for n in stop), default=0) for stop in engine._stages(node)]
    expected = [d - k for k in (2, 4, 8, 16) if d - k > 1] + [1]
    assert depths == expected


def test_entry_starts_equal_one_hot_passes():
    """A pass started as one entry per row (batch norms, ReLUs, residual adds, then a convolution's weights)
    gives the bounds of the dense pass from the one-hot row, at every refined node and stage."""
    gm = trace(_deep_resnet(2))
    x = _inputs(2, 2)
    box = Interval.from_box(x, 0.01, (0.0, 1.0))
    engine = LinearBounds(gm)
    engine.windowed = False
    with torch.no_grad():
        values = engine.bound_graph(box, "crown-ibp").nodes
        checked = 0
        for name in engine.refined:
            node = next(n for n in engine.nodes if n.name == name)
            iv = values[name]
            n = iv.shape[1:].numel()
            rows = torch.arange(2).repeat_interleave(6)
            neuron = torch.randint(0, n, (12,), generator=torch.Generator().manual_seed(len(name)))
            sign = torch.tensor([1.0, -1.0]).repeat(6)
            for stop in engine._stages(node):
                fast = engine.neuron_lower(values, node, rows, neuron, sign, stop)
                A = torch.zeros((12, n))
                A[torch.arange(12), neuron] = sign
                first = engine._backward(node, values, A.reshape((12,) + tuple(iv.shape[1:])), rows)
                dense = engine._run(values, node, first, stop)
                assert torch.allclose(fast, dense, atol=1e-5 * max(1.0, float(dense.abs().max()))), (name, stop)
                checked += 1
    assert checked >= 10


def test_chunks_hold_the_row_budget_and_change_no_bound():
    """Rows per chunk times the coefficients a row holds at once (pending on every waiting node, the skip
    branches of a residual net included, plus a rule's temporaries) stay within the row budget; a small budget
    changes the chunks, not the bounds."""
    gm = trace(_deep_resnet(3))
    x = _inputs(3, 3)
    box = Interval.from_box(x, 0.004, (0.0, 1.0))
    y = gm(x).argmax(1)
    fold = final_linear(gm)
    out = []
    with torch.no_grad():
        for budget in (1 << 24, 4000):
            engine = LinearBounds(gm, row_budget=budget)
            chunks = []
            lower = engine.neuron_lower

            def counted(values, node, rows, neuron, sign, stop=frozenset()):
                chunks.append((rows.shape[0], engine.live_per_row(values, node, stop)))
                return lower(values, node, rows, neuron, sign, stop)

            engine.neuron_lower = counted
            result = engine.bound_graph(box, "crown")
            out.append((result, engine.margin_lower(result.nodes, y, fold)))
            assert chunks
            assert all(rows * live <= max(budget, 2 * live) for rows, live in chunks)
            if budget == 4000:
                assert max(rows for rows, _ in chunks) < 40
        # a residual add waits on its skip branch: more than one map pending besides the temporaries
        add = next(n for n in engine.nodes if n.name in engine.refined and engine.keys[n] == "add")
        size = result.nodes[add.name].shape[1:].numel()
        assert engine.live_per_row(result.nodes, add) > (TEMPORARIES + 1) * size
    (small, m_small), (large, m_large) = out[1], out[0]
    _assert_same_bounds(small, m_small, large, m_large, list(large.nodes))
