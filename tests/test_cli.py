"""CLI behaviour with typer's CliRunner: happy path on tiny data, and every bad input gives one line."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harden.cli.app import app

from conftest import TinyCNN

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("cli")
    state = folder / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    pickled = folder / "whole.pt"
    torch.save(tiny_model, pickled)
    return folder, state, pickled


ARCH = "conftest:TinyCNN"


@pytest.fixture(scope="module")
def bundle(files):
    folder, state, _ = files
    out = folder / "tiny.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite:mask_ratio=0.05",
                    "--key", "k", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bundle"] == str(out)
    return out


def test_layers_json(files):
    _, state, _ = files
    result = invoke("layers", state, "--arch", ARCH, "--data", "digits", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["sites"] == ["relu1", "relu", "relu_1"]
    assert doc["nodes"][0] == {"name": "conv1", "module": "conv1", "op": "conv2d", "spelling": "Conv2d",
                               "shape": [8, 8, 8], "site": False}


def test_export_inspect_round(bundle, tmp_path):
    out = tmp_path / "tiny.onnx"
    result = invoke("export", bundle, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["outputs"] == ["logits", "score", "alarm", "ctt-lite.score", "ctt-lite.alarm"]
    assert doc["parity"]["abs_diff"]["logits"] <= 1e-4
    for target in (bundle, out):
        shown = invoke("inspect", target, "--json")
        assert shown.exit_code == 0, shown.output
        manifest = json.loads(shown.stdout)["manifest"]
        assert manifest["methods"][0]["name"] == "ctt-lite"
        assert "key" not in manifest and manifest["key_fingerprint"]
    human = invoke("inspect", out)
    assert "ctt-lite" in human.stdout and "key fingerprint" in human.stdout


def one_line_error(result, pattern):
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert pattern in lines[0], lines[0]


def test_missing_model_file(tmp_path):
    out = tmp_path / "x.hardened"
    one_line_error(invoke("instrument", tmp_path / "nope.pt", "--arch", ARCH, "--data", "digits",
                          "--method", "ctt-lite", "-o", out), "no model file")
    assert not out.exists()


def test_unreadable_data(files, tmp_path):
    _, state, _ = files
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    out = tmp_path / "x.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", bad, "--method", "ctt-lite", "-o", out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not out.exists()


def test_empty_data(files, tmp_path):
    _, state, _ = files
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    out = tmp_path / "x.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", empty, "--method", "ctt-lite", "-o", out)
    one_line_error(result, "error")
    assert not out.exists()


def test_wrong_input_shape(files, tmp_path):
    _, state, _ = files
    out = tmp_path / "x.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", "mnist", "--limit", "100",
                    "--method", "ctt-lite", "-o", out)
    one_line_error(result, "input shape")
    assert not out.exists()


def test_unknown_method(files, tmp_path):
    _, state, _ = files
    out = tmp_path / "x.hardened"
    one_line_error(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "magic", "-o", out),
                   "unknown method 'magic'")
    assert not out.exists()


def test_pickled_module_needs_trust(files, tmp_path):
    _, _, pickled = files
    out = tmp_path / "x.hardened"
    one_line_error(invoke("instrument", pickled, "--data", "digits", "--method", "ctt-lite", "-o", out),
                   "--trust-pickle")
    assert not out.exists()
    trusted = invoke("instrument", pickled, "--trust-pickle", "--data", "digits", "--method", "ctt-lite",
                     "--key", "k", "-o", out, "--json")
    assert trusted.exit_code == 0, trusted.output
    assert out.exists()


def test_output_in_missing_folder(files, tmp_path):
    _, state, _ = files
    out = tmp_path / "missing" / "x.hardened"
    one_line_error(invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite", "-o", out),
                   "does not exist")
    assert not out.parent.exists()


def test_export_to_missing_folder_and_bad_bundle(bundle, tmp_path):
    one_line_error(invoke("export", bundle, "-o", tmp_path / "no" / "x.onnx"), "does not exist")
    fake = tmp_path / "fake.hardened"
    fake.write_text("hello")
    one_line_error(invoke("export", fake, "-o", tmp_path / "x.onnx"), "not a harden bundle")
    assert not (tmp_path / "x.onnx").exists()


def test_safetynet_support_vector_budget_from_the_cli(files, tmp_path):
    """max_sv reaches the method: a bad value is one line and no file; a small budget caps the SVM."""
    _, state, _ = files
    out = tmp_path / "sn.hardened"
    common = ("instrument", state, "--arch", ARCH, "--data", "digits", "--key", "k", "--method")
    method = "safetynet:attacks=fgsm:eps=0.2,max_train=120,svm_c=10,svm_gamma=0.05,max_sv="
    one_line_error(invoke(*common, method + "0", "-o", out), "max_sv='0' must be >= 1")
    assert not out.exists()
    result = invoke(*common, method + "15", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(invoke("inspect", out, "--json").stdout)
    (method,) = shown["manifest"]["methods"]
    svm = method["config"]["svm"]
    assert svm["max_support_vectors"] == 15
    assert 1 <= svm["support_vectors"] <= 15 < svm["support_vectors_before_budget"]


def test_evaluate_scores_adversarial_sets_made_elsewhere(bundle, tmp_path):
    from harden.bundle.archive import load_bundle

    hardened, manifest = load_bundle(bundle)
    from harden.api import bundle_data

    test = bundle_data(manifest).test
    x, y = test.x[:30].numpy(), test.y[:30].numpy()
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.3, x.shape), 0, 1).astype(np.float32)
    np.savez(tmp_path / "noisy.npz", x=noisy, y=y, x_clean=x)
    result = invoke("evaluate", bundle, "--adversarial", tmp_path / "noisy.npz", "--limit", 30, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]   # no default attacks ran beside the given set
    alarms = hardened.run(noisy)["alarm"]
    correct = hardened.run(x)["logits"].argmax(1) == y
    assert row["attack"] == "given:noisy.npz" and row["n"] == 30
    assert row["detection_rate"] == pytest.approx(alarms[correct].mean())
    np.savez(tmp_path / "wide.npz", x=noisy * 3, y=y)
    one_line_error(invoke("evaluate", bundle, "--adversarial", tmp_path / "wide.npz"), "outside the model's input range")
    one_line_error(invoke("evaluate", bundle, "--adversarial", tmp_path / "none.npz"), "no such file")


@pytest.mark.parametrize("option, value", [("trap_scale", "bogus"), ("trap_placement", "nowhere"), ("anneal", "up")])
def test_ctt_finetuning_choices_are_checked(files, tmp_path, option, value):
    _, state, _ = files
    out = tmp_path / "x.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", f"ctt-strict:{option}={value}",
                    "--key", "k", "-o", out)
    one_line_error(result, f"method 'ctt-strict': {option}={value!r} is not one of")
    assert not out.exists()


def test_fpr_confidence_flag_reaches_the_manifest_and_the_summary(files, tmp_path):
    _, state, _ = files
    out = tmp_path / "c.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite:mask_ratio=0.05",
                    "--key", "k", "--fpr", "0.05", "--fpr-confidence", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads(invoke("inspect", out, "--json").stdout)["manifest"]
    cal = manifest["metrics"]["calibration"]
    assert manifest["fpr_confidence"] == cal["confidence"] == 0.5
    n, c = cal["samples"], cal["allowed_alarms"]
    line = (f"calibration: {n} inputs, at most {c} may alarm for FPR <= 0.05 with confidence 0.5 "
            f"(needs >= {cal['needed_samples']} inputs)")
    assert line in " ".join(result.stdout.split())
    assert line in " ".join(invoke("inspect", out).stdout.split())


def test_a_calibration_split_too_small_for_the_promise_is_one_line(files, tmp_path):
    _, state, _ = files
    out = tmp_path / "x.hardened"
    result = invoke("instrument", state, "--arch", ARCH, "--data", "digits", "--method", "ctt-lite", "--fpr", "0.001",
                    "-o", out)
    one_line_error(result, "at least 2302 inputs; use more data, a larger --fpr, or a lower --fpr-confidence")
    assert not out.exists()


def test_a_bundle_from_before_the_confidence_rule_still_inspects_and_exports(bundle, tmp_path):
    import zipfile

    old = tmp_path / "old.hardened"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                del manifest["metrics"]["calibration"], manifest["fpr_confidence"]
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    human = invoke("inspect", old)
    assert human.exit_code == 0, human.output
    assert "FPR target" in human.stdout and "calibration:" not in human.stdout
    exported = invoke("export", old, "-o", tmp_path / "old.onnx", "--json")
    assert exported.exit_code == 0, exported.output


def test_export_portable_target_is_float32_throughout_and_parity_checked(bundle, tmp_path):
    import onnx

    from harden.export.portable import float64_places

    out = tmp_path / "portable.onnx"
    result = invoke("export", bundle, "-o", out, "--target", "portable", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target"] == "portable" and report["parity"]["samples"] > 0
    model = onnx.load(str(out))
    assert float64_places(model) == 0
    assert {p.key: p.value for p in model.metadata_props}["harden.target"] == "portable"
    one_line_error(invoke("export", bundle, "-o", tmp_path / "x.onnx", "--target", "tflite"), "--target")
    assert not (tmp_path / "x.onnx").exists()
