"""Bundle round trip and ONNX parity: onnxruntime gives the Python side's answers."""

import json
import zipfile

import numpy as np
import onnx
import pytest
import torch

from harden.errors import HardenError
from harden.export import export_onnx
from harden.bundle.archive import load_bundle, save_bundle
from harden.export.runtime import OnnxGraph


@pytest.fixture(scope="module")
def exported(tiny_hardened, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    bundle = folder / "tiny.hardened"
    save_bundle(tiny_hardened, bundle)
    loaded, manifest = load_bundle(bundle)
    result = export_onnx(loaded, folder / "tiny.onnx", source=bundle)
    return bundle, folder / "tiny.onnx", loaded, manifest, result


def test_onnx_contract_outputs(exported):
    _, path, *_ = exported
    graph = OnnxGraph(path)
    assert graph.output_names == ["logits", "score", "alarm", "ctt-lite.score", "ctt-lite.alarm"]
    model = onnx.load(str(path))
    (inp,) = model.graph.input
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")  # dynamic batch
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert types["alarm"] == onnx.TensorProto.BOOL and types["score"] == onnx.TensorProto.FLOAT


def test_onnx_matches_python_on_fresh_test_data(exported, tiny_hardened, digits):
    _, path, loaded, *_ = exported
    x = digits.test.x.numpy()
    got = OnnxGraph(path).run(x)
    ref = tiny_hardened.run(x)
    assert np.abs(got["logits"] - ref["logits"]).max() <= 1e-4
    assert np.abs(got["score"] - ref["score"]).max() <= 1e-4
    assert np.array_equal(got["alarm"], ref["alarm"])
    for batch in (1, 7):
        part = OnnxGraph(path).run(x[:batch])
        assert part["logits"].shape == (batch, 10)


def test_bundle_round_trip_is_exact(exported, tiny_hardened, digits):
    _, _, loaded, manifest, result = exported
    x = digits.test.x
    a, b = tiny_hardened.run(x), loaded.run(x)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert result.torch_parity.abs_diff["logits"] == 0.0


def test_bundle_holds_no_pickle_and_no_raw_key(exported):
    bundle, path, *_ = exported
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        assert "manifest.json" in names
        for name in names:
            data = zf.read(name)
            assert b"test-key" not in data
            if name.endswith(".npz"):
                with zipfile.ZipFile(__import__("io").BytesIO(data)) as inner:
                    for member in inner.namelist():
                        assert member.endswith(".npy")
    assert b"test-key" not in path.read_bytes()


def test_metadata_carries_the_public_manifest(exported):
    _, path, _, manifest, _ = exported
    meta = OnnxGraph(path).metadata
    public = json.loads(meta["harden.manifest"])
    assert public["key_fingerprint"] == manifest["key_fingerprint"]
    assert public["methods"][0]["threshold"] == manifest["methods"][0]["threshold"]


def test_parity_failure_is_an_error_and_writes_nothing(exported, tmp_path):
    bundle, *_ = exported
    loaded, _ = load_bundle(bundle)
    loaded.golden["logits"] = loaded.golden["logits"] + 1.0
    out = tmp_path / "bad.onnx"
    with pytest.raises(HardenError, match="parity"):
        export_onnx(loaded, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_check_is_a_gather_not_a_full_multiply(exported):
    _, path, *_ = exported
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Gather" in ops


def test_ctt_lite_graph_agrees_at_every_onnxruntime_level_and_as_portable_float32(tiny_hardened):
    from portability import check_every_runtime_setting

    check_every_runtime_setting(tiny_hardened)


@pytest.mark.parametrize("scaled", [False, True])
def test_trap_head_joins_the_sites_into_one_subtraction_and_one_max(scaled):
    # one Sub and one ReduceMax over every site's gathered trap neurons, the same numbers as the max over sites
    # of each site's max of (activation - T) / s (a max is exact), and the same ONNX answer
    from harden.methods.ctt import TrapHead

    torch.manual_seed(0)
    shapes = [(4, 6, 6), (8, 3, 3), (5,)]
    sizes = [int(np.prod(s)) for s in shapes]
    head = TrapHead(sizes, [7, 3, 1], scaled=scaled)
    for i, size in enumerate(sizes):
        head.trap(i)[0].copy_(torch.randperm(size)[: len(head.trap(i)[0])].sort().values)
        head.trap(i)[1].copy_(torch.rand(len(head.trap(i)[1])))
        if scaled:
            head.scales(i).copy_(torch.rand(len(head.trap(i)[1])) + 0.5)
    acts = [torch.randn(9, *s) for s in shapes]
    per_site = torch.stack([head.excess(i, a).amax(dim=1) for i, a in enumerate(acts)], dim=1).amax(dim=1)
    assert torch.equal(head(*acts), per_site)

    from harden.export.torch_graph import export_module

    model = export_module(head.eval(), tuple(a[:2] for a in acts), [f"a{i}" for i in range(3)], ["raw"],
                           varargs_after=0)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sub") == 1 and ops.count("ReduceMax") == 1 and ops.count("Gather") == 3
    got = OnnxGraph(model.SerializeToString()).session.run(None, {f"a{i}": a.numpy() for i, a in enumerate(acts)})[0]
    np.testing.assert_array_equal(got, per_site.numpy())
