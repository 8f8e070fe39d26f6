"""Tracing, canonical ops and the naming contract."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harden.errors import HardenError
from harden.graph.analyse import describe
from harden.graph.ops import canonical_op
from harden.graph.trace import sites, trace

from conftest import TinyCNN


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.relu_inplace(self.conv(x))
        x = F.relu(x)
        x = torch.relu(x)
        x = x.relu()
        keep = x
        x = x.relu_()
        x = F.relu(x, inplace=True)
        x = F.relu6(x)
        x = self.relu6(x)
        x = torch.relu_(x)
        x = F.hardtanh(x, 0.0, 6.0)
        x = x + keep  # reads the value the in-place relu_ above left behind
        return x.view(x.size(0), -1)


def test_every_relu_spelling_is_a_site_and_logits_are_unchanged():
    model = Spellings().eval()
    x = torch.randn(4, 1, 8, 8)
    gm = trace(model)
    assert torch.equal(gm(x), model(x))
    keys = [canonical_op(gm, n) for n in sites(gm)]
    assert len(keys) == 10
    assert set(keys) == {"relu", "relu6"}


def test_in_place_ops_become_out_of_place():
    gm = trace(Spellings().eval())
    for node in gm.graph.nodes:
        assert not str(node.target).endswith("_") or node.op == "get_attr"
        if node.op == "call_module":
            assert not getattr(gm.get_submodule(node.target), "inplace", False)


def test_torch_export_graph_has_the_same_sites():
    model = Spellings().eval()
    x = torch.randn(3, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    gm = trace(program.module())
    y = torch.randn(5, 1, 8, 8)
    assert torch.allclose(gm(y), model(y))
    assert len(sites(gm)) == 10


def test_naming_contract_of_the_tiny_cnn():
    """Node names are part of the user-facing contract (--layers, manifests); pin them."""
    gm = trace(TinyCNN().eval())
    infos = describe(gm, torch.zeros(2, 1, 8, 8))
    table = [(i.name, i.module_path, i.op, i.shape, i.is_site) for i in infos]
    assert table == [
        ("conv1", "conv1", "conv2d", (8, 8, 8), False),
        ("relu1", "relu1", "relu", (8, 8, 8), True),
        ("pool", "pool", "max_pool2d", (8, 4, 4), False),
        ("conv2", "conv2", "conv2d", (16, 2, 2), False),
        ("relu", "relu", "relu", (16, 2, 2), True),
        ("size", "size", "size", None, False),
        ("view", "view", "reshape", (64,), False),
        ("fc1", "fc1", "linear", (32,), False),
        ("relu_1", "relu_1", "relu", (32,), True),
        ("fc2", "fc2", "linear", (10,), False),
    ]


def test_untraceable_model_names_the_node_and_suggests_torch_export():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4))
            self.head = Data()

        def forward(self, x):
            return self.head(self.inner(x))

    class Data(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return x
            return -x

    with pytest.raises(HardenError, match=r"node 'head'.*torch.export"):
        trace(Branchy())


def test_model_returning_a_tuple_is_refused():
    class Two(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(HardenError, match="one logits tensor"):
        trace(Two())
