"""Hostile files and careless arguments (issue 20): one case per finding, each refused in one line with exit 2,
with nothing from the file executed (canary files) and nothing written."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TinyCNN
from harden.cli.app import app
from harden.errors import HardenError

runner = CliRunner()
ARCH = "conftest:TinyCNN"
REPO = Path(__file__).resolve().parents[1]
SEAL = "a-seal-key-of-20-chars"


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def refused(result, *words):
    """Exit 2, one line, no traceback, no 'internal error', naming every word given."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


class Payload:
    """Unpickling this runs ``touch marker``: the canary of every code-execution test."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite(src: Path, dst: Path, edits: dict) -> Path:
    """A copy of a zip with members replaced (bytes), edited (callable bytes -> bytes), dropped (None) or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        for name in names:
            data = zin.read(name)
            if name in edits:
                edit = edits[name]
                if edit is None:
                    continue
                data = edit(data) if callable(edit) else edit
            zout.writestr(name, data)
        for name, data in edits.items():
            if name not in names and data is not None and not callable(data):
                zout.writestr(name, data)
    return dst


def edit_json(change):
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def state(folder, tiny_model):
    path = folder / "tiny.pt"
    torch.save(tiny_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pt2(folder, tiny_model):
    program = torch.export.export(tiny_model, (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = folder / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def bundle(folder, tiny_hardened):
    from harden.bundle.archive import save_bundle

    path = folder / "tiny.hardened"
    save_bundle(tiny_hardened, path)
    return path


@pytest.fixture(scope="module")
def sealed(folder, tiny_hardened):
    from harden.bundle.archive import save_bundle

    path = folder / "sealed.hardened"
    save_bundle(tiny_hardened, path, seal_key=SEAL)
    return path


def member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def pt2_root(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()[0].split("/", 1)[0] + "/"


# ----------------------------------------------------------------------------- 1. .pt2 runs no code from the file


def test_torch_own_programs_still_load_and_keep_a_dynamic_batch(pt2, tiny_model):
    from harden.io.model import load_model

    model = load_model(pt2)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model(x), tiny_model(x))


class BatchArithmetic(torch.nn.Module):
    """Shape arithmetic on a dynamic batch (sympy expressions, _operator targets) and lifted tensor constants."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)
        self.register_buffer("offset", torch.tensor([7.0, 8.0, 9.0]), persistent=False)
        self.scale = torch.tensor([1.5, 2.5, 0.5])

    def forward(self, x):
        n = x.shape[0]
        y = x.reshape(n * 2, -1).reshape(n // 1, -1)[:, :8]
        return self.lin(y + (n - 1)) * self.scale + self.offset


def test_programs_with_shape_arithmetic_and_constants_still_load(tmp_path):
    from harden.io.model import load_model

    model = BatchArithmetic().eval()
    x = torch.rand(4, 2, 2, 2)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(program, str(tmp_path / "arith.pt2"))
    loaded = load_model(tmp_path / "arith.pt2")
    for n in (1, 4, 7):
        xb = torch.rand(n, 2, 2, 2)
        assert torch.allclose(loaded(xb), model(xb))


def _payload_cases(pt2: Path, marker: Path) -> dict[str, dict]:
    root = pt2_root(pt2)
    weights = f"{root}data/weights/model_weights_config.json"
    first_weight = json.loads(member(pt2, weights))["config"]
    fqn = next(iter(first_weight))
    path_name = first_weight[fqn]["path_name"]

    def pickled_weight(doc):
        doc["config"][fqn]["use_pickle"] = True

    def opaque_constant(doc):
        doc["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}

    def program(change):
        return {f"{root}models/model.json": edit_json(change)}

    def first_node(doc):
        return doc["graph_module"]["graph"]["nodes"][1]

    def sympify(doc):
        shape = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        shape["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"

    return {
        "sample inputs": {f"{root}data/sample_inputs/model.pt": torch_bytes(((torch.zeros(2, 1, 8, 8),),
                                                                             {"x": Payload(marker)}))},
        "pickled weight": {weights: edit_json(pickled_weight),
                           f"{root}data/weights/{path_name}": torch_bytes(Payload(marker))},
        "opaque constant": {f"{root}data/constants/model_constants_config.json": edit_json(opaque_constant),
                            f"{root}data/constants/opaque_obj_0": b"\x80\x04" + b"N."},
        "sympy expression": program(sympify),
        "guard code": program(lambda d: d.update(guards_code=[f"__import__('os').system('touch {marker}')"])),
        "python target": program(lambda d: first_node(d).update(target="torch.os.system")),
        "unsafe aten op": program(lambda d: first_node(d).update(
            target="torch.ops.aten._sparse_coo_tensor_unsafe.default")),
        "printing aten op": program(lambda d: first_node(d).update(target="torch.ops.aten._print.default")),
        "compiled code": {f"{root}data/aotinductor/model/model.so": b"\x7fELF"},
    }


@pytest.mark.parametrize("case", ["sample inputs", "pickled weight", "opaque constant", "sympy expression",
                                  "guard code", "python target", "unsafe aten op", "printing aten op",
                                  "compiled code"])
def test_a_crafted_pt2_is_refused_before_anything_runs(pt2, tmp_path, case, capfd):
    from harden.io.model import load_model

    marker = tmp_path / "CANARY"
    crafted = rewrite(pt2, tmp_path / "crafted.pt2", _payload_cases(pt2, marker)[case])
    with pytest.raises(HardenError) as info:
        load_model(crafted)
    assert "\n" not in str(info.value)
    refused(invoke("layers", crafted, "--input-shape", "1,8,8"))
    assert not marker.exists(), case
    assert "Fallback" not in capfd.readouterr().err


def test_the_payload_of_the_issue_names_the_global_it_refuses(pt2, tmp_path):
    marker = tmp_path / "CANARY"
    crafted = rewrite(pt2, tmp_path / "evil.pt2", _payload_cases(pt2, marker)["sample inputs"])
    line = refused(invoke("instrument", crafted, "--data", "digits", "--method", "ctt-lite", "-o",
                          tmp_path / "x.hardened"), "system")
    assert "would run code" in line
    assert not marker.exists() and not (tmp_path / "x.hardened").exists()


def test_torch_never_falls_back_to_unpickling_objects_even_past_the_check(pt2, tmp_path, monkeypatch, capfd):
    """The second line of defence: with harden's own archive check switched off, torch's unpickler stays
    weights_only and refuses the payload (torch alone logs 'Fallback to weights_only=False succeeded' and runs it)."""
    import harden.io.pt2 as pt2_module

    marker = tmp_path / "CANARY"
    crafted = rewrite(pt2, tmp_path / "evil.pt2", _payload_cases(pt2, marker)["sample inputs"])
    monkeypatch.setattr(pt2_module, "check_program", lambda data, where: None)
    with pytest.raises(HardenError, match="not a loadable torch.export program"):
        pt2_module.load_program(crafted)
    assert not marker.exists()
    err = capfd.readouterr().err
    assert "Fallback" not in err and "Traceback" not in err   # torch's log records are captured, not printed
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the load


def test_pickle_scanner_sees_globals_built_on_the_stack():
    import pickle

    from harden.io.pickles import check_pickle, pickle_globals

    data = pickle.dumps(Payload(Path("/nonexistent")), protocol=4)  # STACK_GLOBAL with memoized strings
    assert pickle_globals(data, "t") == ["posix.system"] or pickle_globals(data, "t") == ["nt.system"]
    with pytest.raises(HardenError, match="system"):
        check_pickle(data, "t")
    check_pickle(pickle.dumps({"a": [1, 2.5, None, "s"]}, protocol=4), "t")  # plain values name no global


# ----------------------------------------------------------------------------- 2. --arch and the working folder


def test_a_foreign_examples_or_harden_folder_in_the_working_folder_is_not_imported(tmp_path):
    """The README's command (--arch harden.examples.lenet:LeNet5) from a folder holding someone else's examples/,
    harden/ and a module named like a dependency harden imports later: none of them is imported."""
    from harden.examples.lenet import LeNet5

    hostile = tmp_path / "work"
    marker = tmp_path / "CANARY"
    for package in ("examples", "harden", "sklearn", "onnxruntime"):
        (hostile / package).mkdir(parents=True)
        (hostile / package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({package!r})\n")
    (hostile / "examples" / "lenet.py").write_text(f"open({str(marker)!r}, 'a').write('lenet')\n")
    torch.save(LeNet5().state_dict(), hostile / "lenet.pt")
    # the installed `harden` console script: its folder, not the working folder, leads sys.path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "harden").write_text("import sys\nfrom harden.cli.app import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(bin_dir / "harden"), "layers", "lenet.pt", "--arch",
                             "harden.examples.lenet:LeNet5", "--input-shape", "1,28,28", "--json"],
                            cwd=hostile, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sites"] == ["relu1", "relu2", "relu3", "relu4"]
    assert not marker.exists(), marker.read_text()


def test_a_module_only_in_the_working_folder_is_still_found(tmp_path, monkeypatch):
    from harden.io.model import _import_factory

    (tmp_path / "mynet_for_harden_test.py").write_text("import torch.nn as nn\ndef Net():\n    return nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert _import_factory("mynet_for_harden_test:Net")().in_features == 2
    assert sys.path[-1] == str(tmp_path)   # searched last


# ----------------------------------------------------------------------------- 3. never over an input or a special file


def test_instrument_never_writes_over_its_own_model(state):
    before = state.read_bytes()
    refused(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite", "-o", state),
            "input file")
    assert state.read_bytes() == before


def test_instrument_never_writes_over_its_data_or_a_hard_link_of_its_model(state, tmp_path):
    x = (np.random.default_rng(0).random((60, 1, 8, 8))).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.arange(60) % 10)
    refused(invoke("instrument", state, "--arch", ARCH, "--data", data, "--method", "ctt-lite", "-o", data),
            "input file")
    link = tmp_path / "link.pt"
    os.link(state, link)
    refused(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite", "-o", link),
            "input file")


def test_export_never_turns_its_bundle_into_onnx(bundle):
    before = bundle.read_bytes()
    refused(invoke("export", bundle, "-o", bundle), "input file")
    assert bundle.read_bytes() == before


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "symlink"])
def test_special_outputs_are_refused_and_left_alone(bundle, tmp_path, kind):
    target = tmp_path / "out.onnx"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = Path("/dev/null")
    else:
        (tmp_path / "real.onnx").write_bytes(b"keep")
        target.symlink_to(tmp_path / "real.onnx")
    mode = os.lstat(target).st_mode
    line = refused(invoke("export", bundle, "-o", target))
    assert {"folder": "folder", "fifo": "FIFO", "device": "device", "symlink": "symbolic link"}[kind] in line
    assert os.lstat(target).st_mode == mode
    if kind == "symlink":
        assert (tmp_path / "real.onnx").read_bytes() == b"keep"


def test_an_unwritable_output_folder_is_found_before_the_work(state, tmp_path):
    # /proc refuses new files even to root; the data argument would fail later, so the output is checked first
    line = refused(invoke("instrument", state, "--arch", ARCH, "--data", tmp_path / "missing.npz",
                          "--method", "ctt-lite", "-o", "/proc/x.hardened"), "cannot write")
    assert "/proc" in line


# ----------------------------------------------------------------------------- 4. shared arguments and data


@pytest.mark.parametrize("flag, value, words", [
    ("--fpr", "0", "(0, 1)"), ("--fpr", "1", "(0, 1)"), ("--fpr", "nan", "finite"), ("--fpr-confidence", "1", "[0, 1)"),
    ("--device", "bogus", "--device"), ("--device", "toaster:3", "--device"), ("--key", "", "--key"),
    ("--key", "   ", "--key"), ("--limit", "0", "--limit"), ("--policy", "k:2", "--policy"),
    ("--input-range", "1,0", "lo < hi"), ("--input-range", "0,nan", "finite"),
    ("--method", "ctt-strict:eps=-1", "eps"), ("--method", "ctt-strict:eps=nan", "eps"),
    ("--method", "ctt-strict:eps=inf", "eps"), ("--method", "ctt-strict:eps=0", "eps"),
])
def test_meaningless_instrument_arguments_are_refused_before_any_work(state, tmp_path, flag, value, words):
    out = tmp_path / "x.hardened"
    method = [] if flag == "--method" else ["--method", "ctt-lite"]
    started = time.perf_counter()
    line = refused(invoke("instrument", state, "--arch", ARCH, "--data", "digits", *method, flag, value, "-o", out),
                   words)
    assert flag in line or flag in ("--input-range", "--method")
    assert not out.exists()
    assert time.perf_counter() - started < 5   # refused before loading the model and the data


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_cuda_is_one_line(state, tmp_path):
    refused(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite", "--device", "cuda",
                   "-o", tmp_path / "x.hardened"), "cuda is not available")


def test_layers_that_do_not_exist_are_refused(state, tmp_path):
    out = tmp_path / "x.hardened"
    refused(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite:layers=last:99",
                   "-o", out), "last:99", "3 site(s)")
    assert not out.exists()


def test_the_python_api_refuses_the_same_values(tiny_model, digits):
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import Options

    for options, word in [(Options(fpr=0.0), "--fpr"), (Options(key=""), "--key"), (Options(device="bogus"), "--device"),
                          (Options(fpr=float("nan")), "--fpr"), (Options(fpr_confidence=1.0), "--fpr-confidence")]:
        with pytest.raises(HardenError, match=word):
            instrument(tiny_model, digits, ["ctt-lite"], options)


@pytest.mark.parametrize("args, words", [
    (("--eps", "-1"), "--eps"), (("--eps", "nan"), "--eps"), (("--eps", "2"), "(0, 1]"), (("--limit", "0"), "--limit"),
    (("--split", "everything"), "--split"), (("--check", "-1"), "--check"),
])
def test_meaningless_certify_arguments_are_refused(bundle, args, words):
    refused(invoke("certify", bundle, *args), words)


def test_certify_api_refuses_nan_eps(bundle):
    import harden

    hardened, manifest = harden.load_bundle(bundle)
    with pytest.raises(HardenError, match="--eps"):
        harden.certify(hardened, manifest, [float("nan")])


@pytest.mark.parametrize("args, words", [
    (("--limit", "0"), "--limit"), (("--split", "x"), "--split"), (("--adaptive", "--adaptive-steps", "0"), "--adaptive-steps"),
    (("--adaptive", "--adaptive-norm", "l3"), "--adaptive-norm"), (("--adaptive", "--adaptive-eps", "5"), "--adaptive-eps"),
    (("--adaptive", "--adaptive-attacker", "everyone"), "--adaptive-attacker"),
])
def test_meaningless_evaluate_arguments_are_refused(bundle, args, words):
    refused(invoke("evaluate", bundle, *args), words)


def test_data_with_labels_the_model_does_not_have_is_refused(state, tmp_path):
    x = np.random.default_rng(0).random((60, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "wide.npz", x=x, y=np.arange(60) % 13)
    refused(invoke("instrument", state, "--arch", ARCH, "--data", tmp_path / "wide.npz", "--method", "ctt-lite",
                   "-o", tmp_path / "x.hardened"), "labels", "0..9")
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(60, np.int64))
    refused(invoke("instrument", state, "--arch", ARCH, "--data", tmp_path / "one.npz", "--method", "ctt-lite",
                   "-o", tmp_path / "x.hardened"), "two classes")
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(60) % 10)
    refused(invoke("instrument", state, "--arch", ARCH, "--data", tmp_path / "nan.npz", "--method", "ctt-lite",
                   "-o", tmp_path / "x.hardened"), "NaN")
    assert not (tmp_path / "x.hardened").exists()


def test_an_image_folder_names_every_file_that_is_not_an_image(state, tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("hello")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png")
    line = refused(invoke("instrument", state, "--arch", ARCH, "--data", tmp_path / "imgs", "--method", "ctt-lite",
                          "-o", tmp_path / "x.hardened"), "notes.txt", "broken.png", "2 file(s)")
    assert "cannot read images" in line


# ----------------------------------------------------------------------------- 5. bundles are data from elsewhere


def _manifest_edit(change):
    return {"manifest.json": edit_json(change)}


def _method(doc):
    return doc["methods"][0]


LIES = {
    "input range": lambda d: d["input"].update(range=[0.5, 1.0]),
    "input shape": lambda d: d["input"].update(shape=[1, 9, 9]),
    "class count": lambda d: d.update(num_classes=5),
    "threshold": lambda d: _method(d).update(threshold=_method(d)["threshold"] + 0.5),
    "policy k as a float": lambda d: d["policy"].update(k=1.0),
    "policy k too large": lambda d: d["policy"].update(k=2),
    "scale zero": lambda d: _method(d).update(scale=0),
    "threshold text": lambda d: _method(d).update(threshold="nan"),
    "unknown method": lambda d: _method(d).update(name="nothing"),
    "config not an object": lambda d: _method(d).update(config=[1, 2]),
    "head reads a missing node": lambda d: _method(d).update(head_inputs=["nowhere"]),
    "ctt counts of 4e8": lambda d: _method(d)["config"].update(counts=[400_000_000] * len(_method(d)["config"]["counts"])),
    "ctt counts negative": lambda d: _method(d)["config"].update(counts=[-1] * len(_method(d)["config"]["counts"])),
    "outputs": lambda d: d.update(outputs=["logits"]),
    "format": lambda d: d.update(format="1"),
    "finetuned without weights": lambda d: d.update(finetuned=True),
    "metrics as text": lambda d: d["metrics"].update(test_fpr="low"),
    "recipe methods as a list": lambda d: d["recipe"].update(methods=["ctt-lite"]),
    "recipe key that injects a line": lambda d: d["recipe"].update({'x = 1\n[methods.mismatch]\nsecond_model': "a"}),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_manifest_that_lies_is_refused_by_every_command(bundle, tmp_path, lie):
    crafted = rewrite(bundle, tmp_path / "lie.hardened", _manifest_edit(LIES[lie]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in (["inspect", crafted], ["export", crafted, "-o", tmp_path / "x.onnx"],
                    ["certify", crafted, "--limit", "2"], ["evaluate", crafted, "--limit", "2", "--attack", "fgsm:eps=0.1"]):
        refused(invoke(*command))
    assert not (tmp_path / "x.onnx").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024   # KiB: no huge allocation


def test_a_bundles_recipe_prints_as_toml(bundle):
    result = invoke("inspect", bundle, "--recipe")
    assert result.exit_code == 0, result.output
    assert "[methods.ctt-lite]" in result.stdout


def _graph_edit(change):
    return {"classifier.json": edit_json(change)}


def _node(doc, name):
    return next(n for n in doc["nodes"] if n["name"] == name)


def _pad(doc):
    node = _node(doc, "relu")
    node["op"], node["target"] = "call_function", "torch.nn.functional.pad"
    node["args"] = [{"$": "node", "v": "conv2"}, {"$": "tuple", "v": [0, 300_000_000]}]
    node["kwargs"] = []


GRAPHS = {
    "sparse unsafe constructor": lambda d: _node(d, "relu").update(target="aten._sparse_coo_tensor_unsafe.default"),
    "printing op": lambda d: _node(d, "relu").update(target="aten._print.default"),
    "full of 3e8": lambda d: _node(d, "relu").update(target="aten.full.default",
                                                     args=[[300_000_000], 1.0], kwargs=[]),
    "argument of the wrong type": lambda d: _node(d, "relu").update(target="aten.relu.default",
                                                                    args=["not a tensor"], kwargs=[]),
    "padding of 3e8": _pad,
    "module class outside the list": lambda d: dict(d["root"]["children"])["conv1"].update({"class": "LSTM"}),
}


@pytest.mark.parametrize("case", list(GRAPHS))
def test_a_crafted_graph_is_one_validation_line_never_a_crash(bundle, tmp_path, case):
    crafted = rewrite(bundle, tmp_path / "graph.hardened", _graph_edit(GRAPHS[case]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in (["export", crafted, "-o", tmp_path / "x.onnx"], ["certify", crafted, "--limit", "2"]):
        refused(invoke(*command))
    assert not (tmp_path / "x.onnx").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024


def test_a_zip_bombed_member_is_refused_before_it_is_unpacked(bundle, tmp_path):
    bomb = tmp_path / "bomb.hardened"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "golden.npz":
                buffer = io.BytesIO()
                np.savez(buffer, input=np.zeros((40_000_000,), np.float32))   # 160 MB of zeros, ~160 KB deflated
                data = buffer.getvalue()
            zout.writestr(item.filename, data)
    assert bomb.stat().st_size < 2_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    refused(invoke("inspect", bomb), "zip bomb")
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024


def test_an_npz_array_that_states_more_than_it_holds_is_refused(bundle, tmp_path):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (99_999_999_999,)})
    buffer.write(np.zeros(4, np.float32).tobytes())   # a header stating 400 GB over 16 bytes
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("input.npy", buffer.getvalue())
    crafted = rewrite(bundle, tmp_path / "npy.hardened", {"golden.npz": npz.getvalue()})
    refused(invoke("inspect", crafted), "golden.npz", "header states")


def test_a_pickled_array_in_a_bundle_is_refused(bundle, tmp_path):
    marker = tmp_path / "CANARY"
    npz = io.BytesIO()
    np.savez(npz, input=np.array([Payload(marker)], dtype=object))
    crafted = rewrite(bundle, tmp_path / "obj.hardened", {"golden.npz": npz.getvalue()})
    refused(invoke("inspect", crafted), "Python objects")
    assert not marker.exists()


def test_a_detector_that_points_at_an_external_file_is_refused(bundle, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="/etc/passwd")
    graph = helper.make_graph([helper.make_node("Mul", ["ctt-lite.features", "w"], ["ctt-lite.raw"])], "d",
                              [helper.make_tensor_value_info("ctt-lite.features", TensorProto.FLOAT, [None, 1])],
                              [helper.make_tensor_value_info("ctt-lite.raw", TensorProto.FLOAT, [None, 1])], [weight])
    model = helper.make_model(graph).SerializeToString()
    crafted = rewrite(bundle, tmp_path / "ext.hardened", {
        "manifest.json": edit_json(lambda d: _method(d).update(detector=True)),
        "detectors/ctt-lite.onnx": model})
    refused(invoke("inspect", crafted), "external data")
    assert onnx  # imported for the helper


def test_certify_runs_the_golden_check_too(bundle, tmp_path):
    crafted = rewrite(bundle, tmp_path / "t.hardened", _manifest_edit(LIES["threshold"]))
    refused(invoke("certify", crafted, "--limit", "2"), "does not reproduce its recorded outputs")


def _consistent_forgery(source: Path, target: Path) -> Path:
    """A threshold moved AND the recorded outputs recomputed with it: only a seal can tell."""
    import harden
    from harden.detectors.policy import AlarmPolicy

    hardened, manifest = harden.load_bundle(source, seal_key=SEAL if "sealed" in source.name else None)
    manifest["methods"][0]["threshold"] += 1.0
    hardened.policy = AlarmPolicy([m["threshold"] for m in manifest["methods"]],
                                  [m["scale"] for m in manifest["methods"]], manifest["policy"]["k"])
    golden = {"input": hardened.golden["input"], **hardened.run(hardened.golden["input"])}
    buffer = io.BytesIO()
    np.savez(buffer, **golden)
    return rewrite(source, target, {"manifest.json": json.dumps(manifest).encode(), "golden.npz": buffer.getvalue()})


def test_a_consistent_forgery_passes_without_a_seal_and_fails_with_one(bundle, sealed, tmp_path):
    forged = _consistent_forgery(bundle, tmp_path / "forged.hardened")
    assert invoke("inspect", forged).exit_code == 0   # self-consistent: what an unsealed bundle cannot rule out
    forged_sealed = _consistent_forgery(sealed, tmp_path / "forged_sealed.hardened")
    refused(invoke("inspect", forged_sealed, env={"HARDEN_SEAL_KEY": SEAL}), "seal does not match")
    refused(invoke("certify", forged_sealed, "--seal-key", SEAL, "--limit", "2"), "seal does not match")
    refused(invoke("export", forged, "--seal-key", SEAL, "-o", tmp_path / "x.onnx"), "carries no seal")
    shown = invoke("inspect", sealed, "--seal-key", SEAL)
    assert shown.exit_code == 0 and "seal: verified" in shown.stdout
    refused(invoke("inspect", sealed, "--seal-key", SEAL + "x"), "seal does not match")
    refused(invoke("inspect", sealed, "--seal-key", "short"), "at least 16")


def test_evaluate_never_follows_a_bundle_name_stored_in_the_onnx(bundle, tmp_path):
    import onnx

    exported = tmp_path / "model.onnx"
    assert invoke("export", bundle, "-o", exported).exit_code == 0
    model = onnx.load(str(exported))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evil.hardened").write_bytes(bundle.read_bytes())
    for prop in model.metadata_props:
        if prop.key == "harden.bundle":
            prop.value = "elsewhere/evil.hardened"
    onnx.save(model, str(exported))
    refused(invoke("evaluate", exported, "--limit", "2", "--attack", "fgsm:eps=0.1"), "--bundle")
    (tmp_path / "model.hardened").write_bytes(bundle.read_bytes())   # the name beside it, derived from the user's path
    assert invoke("evaluate", exported, "--limit", "4", "--attack", "fgsm:eps=0.1", "--json").exit_code == 0


def test_an_onnx_that_points_at_an_external_file_is_refused(bundle, tmp_path):
    import onnx

    exported = tmp_path / "model.onnx"
    assert invoke("export", bundle, "-o", exported).exit_code == 0
    model = onnx.load(str(exported))
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    exported.write_bytes(model.SerializeToString())
    refused(invoke("inspect", exported), "external data")
    refused(invoke("evaluate", exported, "--bundle", bundle, "--limit", "2"), "external data")


# ----------------------------------------------------------------------------- 5b. one funnel, signals


def test_typer_argument_errors_are_one_line(state):
    refused(invoke("instrument", state, "--fpr", "abc"), "--fpr")
    refused(invoke("certify"), "Missing argument")


def test_a_corrupt_pt2_prints_no_torch_traceback(pt2, tmp_path, capfd):
    crafted = rewrite(pt2, tmp_path / "corrupt.pt2", {f"{pt2_root(pt2)}models/model.json": b"{\"graph_module\": 7}"})
    refused(invoke("layers", crafted))
    assert "Traceback" not in capfd.readouterr().err


SIGNAL_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import typer
    from harden.cli.common import errors_to_exit
    from harden.io.atomic import atomic_path
    target = Path(sys.argv[1])
    try:
        with errors_to_exit():   # what every command runs in
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"partial")
                print("ready", flush=True)
                time.sleep(60)
    except typer.Exit as exc:   # as typer turns it into the exit status
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_remove_the_temporary_file(tmp_path, signum, code):
    target = tmp_path / "out.onnx"
    # A job started in the background by a shell (CI runners, nohup) inherits SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the child the default disposition a terminal's user would have.
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(target)], cwd=REPO, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stdout.readline().strip() == "ready"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # the write is under way
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    assert list(tmp_path.iterdir()) == []   # neither the output nor its temporary file
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and ("terminated" in lines[0] or "interrupted" in lines[0]), err


# ----------------------------------------------------------------------------- the allowlists stay consistent


def test_every_aten_spelling_of_the_op_table_is_in_the_one_aten_allowlist():
    from harden.core.aten_ops import ATEN_OPS
    from harden.graph.graphfile import allowed_functions
    from harden.graph.ops import FUNCTION_SPELLINGS

    spellings = {str(fn) for fn in FUNCTION_SPELLINGS
                 if isinstance(fn, torch._ops.OpOverload) and not fn._schema.is_mutable}
    assert spellings <= ATEN_OPS, sorted(spellings - ATEN_OPS)
    table = allowed_functions()
    for name in ATEN_OPS:   # every listed overload exists in this torch, does not mutate, and resolves
        op = table[name]
        assert isinstance(op, torch._ops.OpOverload) and not op._schema.is_mutable, name
    known = {"Tensor", "int", "SymInt", "float", "bool", "number", "str", "ScalarType", "Layout", "Device",
             "MemoryFormat"}   # the argument types check_aten_call knows how to check

    def base(kind: str) -> str:
        for wrapper in ("Optional[", "List["):
            if kind.startswith(wrapper):
                return base(kind[len(wrapper):-1])
        return kind

    for name in ATEN_OPS:
        for argument in table[name]._schema.arguments:
            assert base(str(argument.real_type)) in known, (name, str(argument.real_type))
