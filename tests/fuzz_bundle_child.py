"""The bundle fuzzer, run in a child process by tests/test_fuzz_bundle.py (so that a crash signal is seen as one).

``python tests/fuzz_bundle_child.py BUNDLE WORKDIR EXAMPLES`` mutates the valid bundle (raw zip bytes, members,
the manifest, the classifier graph and the arrays) with hypothesis, derandomized, and runs ``harden inspect``
on each mutant (the full load: caps, manifest, graph, heads, detectors, golden check), then ``harden export``
on those it refuses.  Every run must exit 0, or 2 with one line; no canary may appear; nothing may be
written.  Prints one JSON line of counts; the case under way is in WORKDIR/current.json, for a crash.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from harden.cli.app import app

BUNDLE, WORK, EXAMPLES = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
CANARY = WORK / "CANARY"
PAYLOAD = f"__import__('os').system('touch {CANARY}')"
runner = CliRunner()
ORIGINAL = {info.filename: zipfile.ZipFile(BUNDLE).read(info.filename) for info in zipfile.ZipFile(BUNDLE).infolist()}
counts = {"cases": 0, "accepted": 0, "refused": 0}


class Canary:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {CANARY}",))


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([Canary()], dtype=object), allow_pickle=True)
    return buffer.getvalue()


NASTY_STRINGS = [PAYLOAD, "os.system", "builtins.eval", "aten._print.default", "aten._sparse_coo_tensor_unsafe.default",
                 "aten.full.default", "torch.load", "../../etc/passwd", "/dev/zero", "LSTM", "Module", "__class__",
                 "nan", "inf", "", "x" * 5000, "k:99", "majority", "any", "ctt-lite", "@input", "@logits",
                 "relu", "conv1", "float64", "cuda", "meta"]
json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2, 255, 10 ** 9, 4 * 10 ** 8, 3 * 10 ** 8, 2 ** 31, 2 ** 63]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 1e-310, 0.5, 1.0]),
    st.sampled_from(NASTY_STRINGS), st.text(max_size=12),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _mutate_json(data: bytes, draw) -> bytes:
    doc = json.loads(data)
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths[1:] or paths))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1] if path else None
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate"]))
    if last is None:
        return json.dumps(draw(json_value)).encode()
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, parent[last])
    else:
        parent[last] = draw(json_value)
    return json.dumps(doc).encode()


def _mutate_npz(data: bytes, draw) -> bytes:
    arrays = dict(np.load(io.BytesIO(data), allow_pickle=False))
    if not arrays:
        return data
    key = draw(st.sampled_from(sorted(arrays)))
    action = draw(st.sampled_from(["values", "shape", "dtype", "drop", "pickled", "huge header"]))
    array = arrays[key]
    if action == "values" and array.size:
        flat = array.reshape(-1).copy()
        index = draw(st.integers(0, flat.size - 1))
        flat[index] = draw(st.sampled_from([0, 1, -1, 1e30, np.nan, np.inf, 2 ** 40])) if flat.dtype.kind == "f" \
            else draw(st.sampled_from([0, 1, -1, 2 ** 31 - 1, 10 ** 6])) if flat.dtype.kind in "iu" else not flat[index]
        arrays[key] = flat.reshape(array.shape)
    elif action == "shape":
        arrays[key] = array.reshape(-1)[: max(array.size - 1, 0)]
    elif action == "dtype" and array.dtype.kind == "f":
        arrays[key] = array.astype(np.float64)
    elif action == "drop":
        del arrays[key]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    if action in ("pickled", "huge header"):
        with zipfile.ZipFile(buffer, "a") as zf:
            if action == "pickled":
                zf.writestr(f"{key}_obj.npy", _pickled())
            else:
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                              "shape": (10 ** 11,)})
                zf.writestr("huge.npy", header.getvalue() + b"\0" * 16)
    return buffer.getvalue()


def _mutate_onnx(data: bytes, draw) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    action = draw(st.sampled_from(["op", "domain", "external", "dims", "bytes"]))
    if action == "op" and graph.node:
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        node.op_type = draw(st.sampled_from(["Expand", "ConstantOfShape", "Loop", "Upsample", "Tile", "RandomNormal",
                                             "Gather", "TopK", "Reshape", "MatMul", "NoSuchOp"]))
    elif action == "domain" and graph.node:
        graph.node[draw(st.integers(0, len(graph.node) - 1))].domain = draw(st.sampled_from(["com.microsoft", "x"]))
    elif action == "external" and graph.initializer:
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="../../../../etc/passwd")
    elif action == "dims" and graph.initializer:
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        if tensor.dims:
            tensor.dims[0] = draw(st.sampled_from([0, 1, 10 ** 9, 2 ** 40]))
    else:
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return model.SerializeToString()


def _mutant(draw) -> bytes:
    members = dict(ORIGINAL)
    detectors = sorted(n for n in members if n.endswith(".onnx"))
    kind = draw(st.sampled_from(["manifest", "manifest", "graph", "graph", "arrays", "members", "bytes"]
                                + ["detector", "detector"] * bool(detectors)))
    if kind == "detector":
        name = draw(st.sampled_from(detectors))
        members[name] = _mutate_onnx(members[name], draw)
    elif kind == "manifest":
        members["manifest.json"] = _mutate_json(members["manifest.json"], draw)
    elif kind == "graph":
        members["classifier.json"] = _mutate_json(members["classifier.json"], draw)
    elif kind == "arrays":
        name = draw(st.sampled_from(sorted(n for n in members if n.endswith(".npz"))))
        members[name] = _mutate_npz(members[name], draw)
    elif kind == "members":
        name = draw(st.sampled_from(sorted(members)))
        action = draw(st.sampled_from(["drop", "rename", "garbage", "extra"]))
        if action == "drop":
            del members[name]
        elif action == "rename":
            members[name + ".old"] = members.pop(name)
        elif action == "garbage":
            members[name] = draw(st.binary(max_size=64))
        else:
            members["detectors/ctt-lite.onnx"] = draw(st.binary(max_size=64))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(buffer.getvalue())
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(raw) - 1))
            raw[position] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


def _check(result, command: str) -> str:
    output = result.output.strip()
    if result.exit_code == 0:
        return "accepted"
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.exit_code == 2, f"{command}: exit {result.exit_code}: {output[:500]}"
    assert len(lines) == 1, f"{command}: {len(lines)} lines: {output[:500]}"
    assert "internal error" not in lines[0] and "out of memory" not in lines[0], lines[0]
    return "refused"


# CI draws the same mutants every run; HARDEN_HYPOTHESIS_PROFILE=explore draws fresh ones (tests/conftest.py)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("HARDEN_HYPOTHESIS_PROFILE") != "explore",
          database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def fuzz(data):
    mutant = WORK / "mutant.hardened"
    mutant.write_bytes(_mutant(data.draw))
    (WORK / "current.json").write_text(json.dumps({"case": counts["cases"]}))
    counts["cases"] += 1
    result = runner.invoke(app, ["inspect", str(mutant)], catch_exceptions=False)
    verdict = _check(result, "inspect")
    counts[verdict] += 1
    if verdict == "refused" and "--messages" in sys.argv:   # for a person tuning the fuzzer: what refused each
        print(result.output.strip()[:160], file=sys.stderr)
    if verdict == "refused":
        out = WORK / "mutant.onnx"
        _check(runner.invoke(app, ["export", str(mutant), "-o", str(out)], catch_exceptions=False), "export")
        assert not out.exists(), "a refused bundle was exported"
    leftovers = [p.name for p in WORK.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert not CANARY.exists(), "code from the bundle ran"


def _pt2_mutant(draw) -> bytes:
    members = dict(ORIGINAL)
    root = next(iter(members)).split("/", 1)[0] + "/"
    jsons = sorted(n for n in members if n.endswith(".json"))
    kind = draw(st.sampled_from(["program", "program", "config", "pickle", "members", "bytes"]))
    if kind == "program":
        members[root + "models/model.json"] = _mutate_json(members[root + "models/model.json"], draw)
    elif kind == "config":
        name = draw(st.sampled_from(jsons))
        members[name] = _mutate_json(members[name], draw)
    elif kind == "pickle":
        members[root + "data/sample_inputs/model.pt"] = draw(st.sampled_from([_pickled(), b"garbage", b""]))
    elif kind == "members":
        name = draw(st.sampled_from(sorted(members)))
        if draw(st.booleans()):
            del members[name]
        else:
            members[root + draw(st.sampled_from(["data/aotinductor/m.so", "data/weights/weight_99", "x/../y"]))] = b"1"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(buffer.getvalue())
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("HARDEN_HYPOTHESIS_PROFILE") != "explore",
          database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def fuzz_pt2(data):
    """The same contract for .pt2 programs (``--pt2``): ``harden layers`` loads and runs the program."""
    mutant = WORK / "mutant.pt2"
    mutant.write_bytes(_pt2_mutant(data.draw))
    counts["cases"] += 1
    result = runner.invoke(app, ["layers", str(mutant), "--input-shape", sys.argv[4] if len(sys.argv) > 4 and
                                 not sys.argv[4].startswith("--") else "1,8,8"], catch_exceptions=False)
    verdict = _check(result, "layers")
    counts[verdict] += 1
    if verdict == "refused" and "--messages" in sys.argv:
        print(result.output.strip()[:160], file=sys.stderr)
    assert not CANARY.exists(), "code from the program ran"


if __name__ == "__main__":
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fuzz_pt2() if "--pt2" in sys.argv else fuzz()
    counts["peak_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    print(json.dumps(counts), flush=True)
