"""The graph file: a GraphModule as JSON + numpy arrays, round-tripped without unpickling anything."""

from __future__ import annotations

import json
import math
import operator
import pickle

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.errors import HardenError
from harden.graph.trace import trace
from harden.graph.graphfile import (
    FORMAT,
    _decode,
    _encode,
    allowed_functions,
    graph_from_json,
    graph_to_json,
)


class Net(nn.Module):
    """conv/bn/relu/pool, nested Sequential paths, F.relu, torch.relu, view(size(0), -1), cat, +."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.branch = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4 * 2, 10))

    def forward(self, x):
        x = self.features(x)
        y = F.relu(self.branch(x))
        z = torch.relu(x) + y
        c = torch.cat([z, y], dim=1)
        c = c.view(c.size(0), -1)
        return self.head[1](c)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    bn = model.features[1]
    with torch.no_grad():  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(7)
    return model.eval()


def _roundtrip(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict, dict]:
    doc, arrays = graph_to_json(gm)
    doc = json.loads(json.dumps(doc, allow_nan=False))  # strict JSON in between
    return graph_from_json(doc, arrays), doc, arrays


def _same_structure(a: fx.GraphModule, b: fx.GraphModule) -> None:
    assert [(n.name, n.op) for n in a.graph.nodes] == [(n.name, n.op) for n in b.graph.nodes]
    assert [n.target for n in a.graph.nodes] == [n.target for n in b.graph.nodes]
    assert [repr(n.args) for n in a.graph.nodes] == [repr(n.args) for n in b.graph.nodes]
    assert [repr(n.kwargs) for n in a.graph.nodes] == [repr(n.kwargs) for n in b.graph.nodes]
    assert [(k, type(m)) for k, m in a.named_modules() if k] == [(k, type(m)) for k, m in b.named_modules() if k]
    assert [(k, m.training) for k, m in a.named_modules()] == [(k, m.training) for k, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    assert all(pa[k].requires_grad == pb[k].requires_grad for k in pa)
    assert type(a).__name__ == type(b).__name__


def test_symbolic_traced_model_round_trips_bit_identically():
    model = _model()
    gm = trace(model)
    loaded, doc, arrays = _roundtrip(gm)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    _same_structure(gm, loaded)
    assert doc["format"] == FORMAT
    assert isinstance(loaded.get_submodule("features.0"), nn.Conv2d)
    assert isinstance(loaded.get_submodule("features.1"), nn.BatchNorm2d)
    assert loaded.get_submodule("branch").bias is None
    assert "branch.bias" not in arrays
    assert arrays["features.1.num_batches_tracked"].shape == ()  # 0-d stays 0-d
    functions = {n["target"] for n in doc["nodes"] if n["op"] == "call_function"}
    assert {"torch.nn.functional.relu", "torch.relu", "operator.add", "torch.cat"} <= functions
    # saving the loaded graph again gives the same document and arrays
    doc2, arrays2 = graph_to_json(loaded)
    assert json.loads(json.dumps(doc2)) == doc
    assert list(arrays2) == list(arrays) and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)


def test_exported_model_with_dynamic_batch_round_trips_bit_identically():
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    gm = trace(exported.module())
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    loaded, doc, _ = _roundtrip(gm)
    _same_structure(gm, loaded)
    for n in (2, 5):  # the batch stays dynamic: view's shape is read from aten.sym_size
        xb = torch.randn(n, 1, 8, 8)
        assert torch.equal(loaded(xb), model(xb))
        assert torch.equal(loaded(xb), gm(xb))
    targets = {n["target"] for n in doc["nodes"]}
    assert {"aten.conv2d.default", "aten.sym_size.int", "aten.view.default"} <= targets
    attrs = [n for n in loaded.graph.nodes if n.op == "get_attr"]
    assert "features.1.running_mean" in {n.target for n in attrs}
    assert "features.1.running_mean" in dict(loaded.named_buffers())
    assert "features.0.weight" in dict(loaded.named_parameters())


def test_exported_model_with_static_batch_keeps_its_baked_in_batch():
    """Without a Dim, torch.export bakes the sample's batch into view(); the file keeps that as is."""
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    gm = trace(torch.export.export(model, (x,)).module())
    loaded, _, _ = _roundtrip(gm)
    _same_structure(gm, loaded)
    assert torch.equal(loaded(x), model(x))
    view = next(n for n in loaded.graph.nodes if n.target is torch.ops.aten.view.default)
    assert view.args[1] == [2, -1]
    with pytest.raises(RuntimeError):  # as with the exported graph itself
        loaded(torch.randn(3, 1, 8, 8))


class Zoo(nn.Module):
    """Every torch.nn leaf module harden knows, in the settings that matter."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4, momentum=None)
        self.c2 = nn.Conv2d(2, 4, 3, padding="same", dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv2d(4, 4, (3, 1), stride=(2, 1), padding=(1, 0), padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.ReLU(), nn.ReLU6()),
            nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 0.5), nn.Sigmoid(), nn.Tanh(),
        )
        self.maxpool = nn.MaxPool2d(2, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(2, stride=1, count_include_pad=False, padding=1)
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.fc = nn.Linear(16 + 4 * 2 * 2, 6)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        s = self.bn1(self.c1(x.flatten(2)))  # [N, 4, 16]
        y = self.bn2(self.c3(self.c2(x)))
        y = self.blocks(y)
        y = self.avgpool(self.maxpool(y))
        y = self.flatten(self.gap(y))
        z = torch.cat([s.mean(1), y], dim=1)
        return self.softmax(self.fc(self.ident(self.drop(z))))


def test_every_supported_module_class_round_trips():
    torch.manual_seed(1)
    model = Zoo()
    model.train()
    for _ in range(2):  # running statistics, num_batches_tracked > 0
        model(torch.randn(4, 2, 4, 4))
    model.eval()
    gm = trace(model)
    loaded, _, _ = _roundtrip(gm)
    _same_structure(gm, loaded)
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(loaded(x), model(x))
    for path, module in gm.named_modules():
        twin = loaded.get_submodule(path)
        if path:
            assert {k: v for k, v in vars(module).items() if not k.startswith("_") or k.startswith("_rev")} == {
                k: v for k, v in vars(twin).items() if not k.startswith("_") or k.startswith("_rev")
            } or type(module) is nn.Module, path
    assert loaded.get_submodule("c2").padding == "same"
    assert loaded.get_submodule("c2")._reversed_padding_repeated_twice == [2, 2, 2, 2]  # a list stays a list
    assert loaded.get_submodule("c3").padding == (1, 0)
    assert loaded.get_submodule("bn1").momentum is None
    assert isinstance(loaded.get_submodule("blocks.0.1"), nn.ReLU6)


def test_training_flags_requires_grad_and_persistence_survive():
    model = _model()
    gm = trace(model)
    gm.get_submodule("branch").weight.requires_grad_(False)
    gm.get_submodule("features.0").train()
    gm.get_submodule("features.1").register_buffer("scratch", torch.ones(2), persistent=False)
    loaded, _, _ = _roundtrip(gm)
    assert loaded.get_submodule("branch").weight.requires_grad is False
    assert loaded.get_submodule("features.0").weight.requires_grad is True
    assert loaded.get_submodule("features.0").training is True
    assert loaded.get_submodule("features.1").training is False
    assert "features.1.scratch" not in loaded.state_dict()
    assert torch.equal(loaded.get_submodule("features.1").scratch, torch.ones(2))


def test_shared_tensors_and_modules_stay_shared():
    torch.manual_seed(0)
    root = nn.Module()
    root.a = nn.Linear(3, 3)
    root.b = root.a
    root.c = nn.Linear(3, 3)
    root.c.weight = root.a.weight
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("a", (x,))
    y = graph.call_module("b", (y,))
    graph.output(graph.call_module("c", (y,)))
    gm = fx.GraphModule(root, graph)
    loaded, doc, arrays = _roundtrip(gm)
    assert loaded.get_submodule("b") is loaded.get_submodule("a")
    assert loaded.get_submodule("c").weight is loaded.get_submodule("a").weight
    assert "c.weight" not in arrays
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), gm(x))


def test_tensor_dtypes_and_special_values_round_trip_exactly():
    root = nn.Module()
    tensors = {
        "f32": torch.tensor([1.5, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45]),
        "f64": torch.tensor([math.pi, -1e308], dtype=torch.float64),
        "f16": torch.tensor([0.1, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([0.1, -3.0], dtype=torch.bfloat16),
        "i64": torch.tensor([2**62, -5]),
        "i32": torch.tensor([7], dtype=torch.int32),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    graph = fx.Graph()
    x = graph.placeholder("x")
    got = []
    for name, tensor in tensors.items():
        root.register_buffer(name, tensor)
        got.append(graph.get_attr(name))
    graph.output((x, *got))
    gm = fx.GraphModule(root, graph, "Constants")
    loaded, _, arrays = _roundtrip(gm)
    outputs = loaded(torch.ones(1))
    for (name, tensor), out in zip(tensors.items(), outputs[1:]):
        assert out.dtype == tensor.dtype and out.shape == tensor.shape, name
        assert torch.equal(out.view(-1).view(torch.uint8) if out.numel() else out,
                           tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor), name
    assert arrays["scalar"].shape == ()


class Literals(nn.Module):
    def forward(self, x):
        y = x[:, 1:3, ..., ::2]
        y = y.to(torch.float64).to(device=torch.device("cpu"), dtype=torch.float32)
        y = y.contiguous(memory_format=torch.contiguous_format)
        y = F.hardtanh(y, -math.inf, 1e30)
        y = y.reshape(y.shape[0], -1).view(torch.Size([-1, 2]))  # fx turns the Size into a tuple
        return y.clamp(min=-3.5)


def test_literal_arguments_keep_their_types():
    model = Literals().eval()
    gm = trace(model)
    loaded, doc, _ = _roundtrip(gm)
    _same_structure(gm, loaded)
    x = torch.randn(2, 4, 3, 6)
    assert torch.equal(loaded(x), model(x))
    text = json.dumps(doc)
    for tag in ("slice", "ellipsis", "dtype", "device", "memory_format", "float", "tuple"):
        assert f'"$": "{tag}"' in text, tag


@pytest.mark.parametrize("value", [
    None, True, False, 0, -3, 2**70, 1.0, -0.0, 1e-310, float("inf"), float("-inf"), "s", "",
    (1, 2), [1, 2], ((1,), [2, (3,)]), (), [], {"a": 1, 2: (3,)},
    slice(None), slice(1, None, -1), Ellipsis, torch.Size([2, 3]), torch.float16, torch.bool,
    torch.device("cpu"), torch.strided, torch.channels_last,
])
def test_values_round_trip_with_their_exact_types(value):
    back = _decode(json.loads(json.dumps(_encode(value, "t"), allow_nan=False)), "t", {})
    assert type(back) is type(value) and repr(back) == repr(value)
    if isinstance(value, float):
        assert math.copysign(1, back) == math.copysign(1, value)


def test_nan_round_trips():
    back = _decode(json.loads(json.dumps(_encode(float("nan"), "t"), allow_nan=False)), "t", {})
    assert math.isnan(back)


def test_every_allowlisted_function_resolves_to_itself():
    from harden.graph.ops import FUNCTION_SPELLINGS, OUT_OF_PLACE_FUNCTIONS
    from harden.graph.graphfile import _function_name, _resolve_function

    from harden.graph.graphfile import PURE_FUNCTIONS

    table = allowed_functions()
    for fn in [*FUNCTION_SPELLINGS, *OUT_OF_PLACE_FUNCTIONS, *OUT_OF_PLACE_FUNCTIONS.values(), *PURE_FUNCTIONS,
               getattr, operator.getitem]:
        name = _function_name(fn)
        if isinstance(fn, torch._ops.OpOverload) and fn._schema.is_mutable:
            assert name not in table  # in-place ATen spellings are traced out of place; a file may not call them
            continue
        assert table[name] is fn
        assert _resolve_function(name, "n") is fn
    assert _resolve_function("aten.hardswish.default", "n") is torch.ops.aten.hardswish.default


class ModernActivations(nn.Module):
    """Functional calls of MobileNet- / ViT-style classifiers (hardswish, SiLU, GELU, layer norm, clamp)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.silu(F.hardswish(self.conv(x)))
        h = F.layer_norm(h.flatten(1), (4 * 8 * 8,))
        return self.fc(torch.clamp(F.gelu(h), -3.0, 3.0))


def test_functional_activations_of_modern_classifiers_round_trip_bit_identically():
    torch.manual_seed(0)
    model = ModernActivations().eval()
    gm = trace(model)
    loaded, doc, _ = _roundtrip(gm)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    functions = {n["target"] for n in doc["nodes"] if n["op"] == "call_function"}
    assert {"torch.nn.functional.hardswish", "torch.nn.functional.silu", "torch.nn.functional.gelu",
            "torch.nn.functional.layer_norm", "torch.clamp"} <= functions
    assert "torch.save" not in allowed_functions() and "torch.load" not in allowed_functions()


# ----------------------------------------------------------------------------- refusals


def _saved() -> tuple[dict, dict]:
    doc, arrays = graph_to_json(trace(_model()))
    return json.loads(json.dumps(doc)), arrays


def _refused(doc, arrays, *words):
    with pytest.raises(HardenError) as info:
        graph_from_json(doc, arrays)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def _node(doc, name):
    return next(n for n in doc["nodes"] if n["name"] == name)


@pytest.mark.parametrize("target", [
    "os.system", "builtins.eval", "builtins.exec", "posix.system", "subprocess.Popen", "torch.load",
    "pickle.loads", "aten.save.default", "aten.from_file.default", "aten.copy_.default",
    "aten.no_such_op.default", "aten.conv2d.nope", "torch.ops.aten.conv2d.default", 42, None,
])
def test_tampered_function_target_is_refused(target):
    doc, arrays = _saved()
    _node(doc, "relu")["target"] = target
    _refused(doc, arrays, "relu")


@pytest.mark.parametrize("cls", ["subprocess.Popen", "Popen", "GraphModule", "Parameter", "functional",
                                 "DataParallel", "__class__", "", 3])
def test_tampered_module_class_is_refused(cls):
    doc, arrays = _saved()
    children = dict(doc["root"]["children"])
    children["branch"]["class"] = cls
    _refused(doc, arrays, "branch")


@pytest.mark.parametrize("method", ["__class__", "register_forward_hook", "numpy", "__reduce__", "copy_"])
def test_tampered_method_is_refused(method):
    doc, arrays = _saved()
    _node(doc, "view")["target"] = method
    _refused(doc, arrays, "view")


def test_getattr_only_reads_plain_tensor_attributes():
    doc, arrays = _saved()
    node = _node(doc, "view")
    node["op"], node["target"] = "call_function", "builtins.getattr"
    node["args"], node["kwargs"] = [{"$": "node", "v": "cat"}, "__class__"], []
    _refused(doc, arrays, "getattr")


def test_generated_code_cannot_be_injected(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    cases = []
    doc, arrays = _saved()
    _node(doc, "x")["target"] = f"x={payload}"
    cases.append(doc)
    doc, _ = _saved()
    _node(doc, "branch")["target"] = f'branch"); {payload}; getattr(self, "branch'
    cases.append(doc)
    doc, _ = _saved()
    _node(doc, "cat")["kwargs"] = [[f"dim={payload}, x", 1]]
    cases.append(doc)
    doc, _ = _saved()
    _node(doc, "relu")["name"] = f"relu = {payload}; relu"
    cases.append(doc)
    doc, _ = _saved()
    doc["class_name"] = f"A; {payload}"
    cases.append(doc)
    doc, _ = _saved()
    dict(doc["root"]["children"])["branch"]["attributes"] = [["__class__", "x"]]
    cases.append(doc)
    for doc in cases:
        _refused(doc, arrays)
    assert not marker.exists()


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.5])
def test_unknown_format_version_is_refused(version):
    doc, arrays = _saved()
    doc["format"] = version
    _refused(doc, arrays, "format")


def test_missing_format_is_refused():
    doc, arrays = _saved()
    del doc["format"]
    _refused(doc, arrays, "format")


def _deep(n):
    value = 1
    for _ in range(n):
        value = {"$": "tuple", "v": [value]}
    return value


def _mutations():
    def drop(key):
        return lambda d, a: d.pop(key)

    def node_field(name, key, value):
        def edit(d, a):
            _node(d, name)[key] = value
        return edit

    def drop_node_field(name, key):
        return lambda d, a: _node(d, name).pop(key)

    def child(name, key, value):
        def edit(d, a):
            dict(d["root"]["children"])[name][key] = value
        return edit

    def tensor_field(key, value):
        def edit(d, a):
            bn = dict(dict(d["root"]["children"])["features"]["children"])["1"]
            dict(bn["buffers"])["running_mean"][key] = value
        return edit

    return {
        "foreign object": lambda d, a: d.clear() or d.update({"x": 1}),
        "no nodes": drop("nodes"),
        "no root": drop("root"),
        "no class_name": drop("class_name"),
        "no kind": drop("kind"),
        "nodes not a list": lambda d, a: d.update(nodes={"a": 1}),
        "node not a dict": lambda d, a: d["nodes"].insert(0, 7),
        "node without op": drop_node_field("relu", "op"),
        "node without args": drop_node_field("relu", "args"),
        "unknown op": node_field("relu", "op", "call_everything"),
        "dangling reference": node_field("relu", "args", [{"$": "node", "v": "nowhere"}]),
        "forward reference": node_field("relu", "args", [{"$": "node", "v": "output"}]),
        "unknown tag": node_field("relu", "args", [{"$": "pickle", "v": "x"}]),
        "extra tag keys": node_field("relu", "args", [{"$": "node", "v": "branch", "w": 1}]),
        "bad float": node_field("relu", "args", [{"$": "float", "v": "1e5"}]),
        "bad dtype": node_field("relu", "args", [{"$": "dtype", "v": "Tensor"}]),
        "bad device": node_field("relu", "args", [{"$": "device", "v": "toaster:9"}]),
        "bad size": node_field("relu", "args", [{"$": "size", "v": ["a"]}]),
        "bad slice": node_field("relu", "args", [{"$": "slice", "v": [1]}]),
        "kwargs not pairs": node_field("relu", "kwargs", {"inplace": False}),
        "placeholder default is a node": node_field("x", "args", [{"$": "node", "v": "x"}]),
        "get_attr with arguments": lambda d, a: d["nodes"].insert(0, {
            "name": "w", "op": "get_attr", "target": "branch.weight", "args": [1], "kwargs": []}),
        "existing attribute as parameter": lambda d, a: d["root"]["parameters"].append(["graph", None]),
        "deep nesting": node_field("relu", "args", [_deep(5000)]),
        "duplicate name": node_field("relu", "name", "branch"),
        "empty name": node_field("relu", "name", ""),
        "dangling module": node_field("branch", "target", "nowhere"),
        "root module called": node_field("branch", "target", ""),
        "namespace called": node_field("branch", "target", "features"),
        "get_attr of a module": node_field("branch", "op", "get_attr"),
        "no output": lambda d, a: d["nodes"].pop(),
        "two outputs": lambda d, a: d["nodes"].append({**d["nodes"][-1], "name": "output_1"}),
        "output not last": lambda d, a: d["nodes"].insert(0, d["nodes"].pop()),
        "children not a list": child("branch", "children", 3),
        "bad parameter entry": child("branch", "parameters", [["weight"]]),
        "bad attribute name": child("branch", "attributes", [["forward", 1]]),
        "internal attribute": child("branch", "attributes", [["_parameters", 1]]),
        "bad child name": child("features", "children", [["a.b", None]]),
        "same_as unknown": lambda d, a: dict(d["root"]["children"]).__getitem__("branch").update(same_as="zzz"),
        "missing array": lambda d, a: a.pop("branch.weight"),
        "array not numpy": lambda d, a: a.update({"branch.weight": [1.0]}),
        "wrong array dtype": lambda d, a: a.update({"branch.weight": a["branch.weight"].astype(np.float64)}),
        "wrong array shape": lambda d, a: a.update({"branch.weight": a["branch.weight"].reshape(-1)}),
        "bad tensor dtype": tensor_field("dtype", "object"),
        "bad tensor shape": tensor_field("shape", [-1]),
        "requires_grad not bool": tensor_field("requires_grad", "yes"),
        "tensor without dtype": lambda d, a: tensor_field("dtype", None)(d, a),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_malformed_documents_are_one_line_harden_errors(case):
    doc, arrays = _saved()
    arrays = dict(arrays)
    _mutations()[case](doc, arrays)
    _refused(doc, arrays)


@pytest.mark.parametrize("doc", [None, [], "graph", 3])
def test_non_object_documents_are_refused(doc):
    _refused(doc, {})


def test_arrays_must_be_a_dict():
    doc, _ = _saved()
    _refused(doc, None, "arrays")


class MyReLU(nn.ReLU):
    pass


MyReLU.__name__ = MyReLU.__qualname__ = "ReLU"  # same name as torch.nn.ReLU: still refused


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("leaf", [Scale(), MyReLU()])
def test_custom_leaf_module_is_refused_at_save_time(leaf):
    root = nn.Module()
    root.body = nn.Sequential(nn.Conv2d(1, 1, 1), leaf)
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("body.0", (x,))
    graph.output(graph.call_module("body.1", (y,)))
    gm = fx.GraphModule(root, graph)
    with pytest.raises(HardenError) as info:
        graph_to_json(gm)
    assert "body_1" in str(info.value) and "body.1" in str(info.value)
    assert type(leaf).__module__ in str(info.value)


def test_unallowlisted_function_is_refused_at_save_time():
    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(HardenError, match="cumsum"):
        graph_to_json(trace(Cumulative()))


def test_module_with_hooks_is_refused_at_save_time():
    gm = trace(_model())
    gm.get_submodule("branch").register_forward_hook(lambda m, i, o: o * 0)
    with pytest.raises(HardenError, match="hooks"):
        graph_to_json(gm)


def test_loading_never_unpickles(monkeypatch):
    doc, arrays = _saved()

    def boom(*a, **k):
        raise AssertionError("unpickling during graph load")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    graph_from_json(doc, arrays)


def test_member_names_that_generated_code_cannot_spell_are_refused_at_save_time():
    root = nn.Module()
    root.add_module("conv-1", nn.Conv2d(1, 1, 1))
    graph = fx.Graph()
    graph.output(graph.call_module("conv-1", (graph.placeholder("x"),)))
    with pytest.raises(HardenError, match="conv-1"):
        graph_to_json(fx.GraphModule(root, graph))
