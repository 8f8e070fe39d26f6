"""Type II (adaptive) attacks: the surrogate registry, SafetyNet's surrogate, the attack, and `evaluate --adaptive`."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
from harden.methods.surrogates import surrogates_for
from harden.cli.app import app
from harden.errors import HardenError
from harden.instrumentation.pipeline import instrument
from harden.bundle.archive import load_bundle, save_bundle
from harden.methods.base import MethodSpec, Options

FAST = {"max_train": 200, "svm_c": 1.0, "svm_gamma": 0.05, "attacks": ["fgsm:eps=0.2"]}


@pytest.fixture(scope="module")
def loaded(tiny_model, digits, tmp_path_factory):
    """A two-site quaternary SafetyNet (a grid-pooled conv site and a dense one), through a bundle round trip."""
    method = MethodSpec.of("safetynet", layers="last:2", code="quaternary", **FAST)
    hardened = instrument(tiny_model, digits, [method], Options(key="adaptive-test", fpr=0.05))
    path = tmp_path_factory.mktemp("adaptive") / "sn.hardened"
    save_bundle(hardened, path)
    return load_bundle(path)[0]


def _surrogate_scores(hardened, x, smooth, **settings):
    (surrogate,) = surrogates_for(hardened, settings).values()
    from harden.graph.analyse import feature_extractor

    _, *acts = feature_extractor(hardened.classifier, surrogate.nodes)(x)
    surrogate.prepare(acts)
    return surrogate, surrogate.raw(acts, smooth)


def test_exact_surrogate_is_the_shipped_detector(loaded, digits):
    x = digits.test.x[:200]
    surrogate, exact = _surrogate_scores(loaded, x, smooth=False)
    # the conv site and the dense site are both read before their ReLU (same hard code, gradients for off units)
    assert surrogate.nodes == ["conv2", "fc1"]
    shipped = loaded.raw_scores(loaded.torch_outputs(x))[:, 0]   # the bundle's detector, run in onnxruntime
    assert np.abs(exact.detach().numpy() - shipped).max() <= 1e-4


def test_smoothed_surrogate_has_gradients_and_tends_to_the_exact_score(loaded, digits):
    x = digits.test.x[:100].clone().requires_grad_(True)
    _, smooth = _surrogate_scores(loaded, x, smooth=True)
    (grad,) = torch.autograd.grad(smooth.sum(), x)
    assert (grad.flatten(1).abs().sum(1) > 0).float().mean() > 0.9
    # narrow sigmoids and the real gamma: the smoothed score approaches the exact one
    _, exact = _surrogate_scores(loaded, x.detach(), smooth=False)
    _, sharp = _surrogate_scores(loaded, x.detach(), smooth=True, temperature=1e-4, widen=1.0)
    _, soft = _surrogate_scores(loaded, x.detach(), smooth=True)
    sharp_err = (sharp - exact).abs().median()
    assert sharp_err < 1e-3 < (soft - exact).abs().median()


def test_wins_are_real_and_type_ii_beats_type_i(loaded, digits):
    x, y = digits.test.x[:60].numpy(), digits.test.y[:60].numpy()
    settings = AdaptiveSettings(eps=0.2, steps=20)
    out = loaded.run(x)
    correct = out["logits"].argmax(1) == y
    success = {}
    for lams, supports in (((0.0,), ("all",)), ((1.0, 10.0), ("all", "ink"))):
        result = adaptive_attack(loaded, x, y, settings, input_range=digits.input_range, lams=lams, supports=supports)
        adv = loaded.run(result["x_adv"])
        assert np.abs(result["x_adv"] - x).max() <= 0.2 + 1e-6
        assert result["x_adv"].min() >= digits.input_range[0] and result["x_adv"].max() <= digits.input_range[1]
        fooled = adv["logits"].argmax(1) != y
        won = result["won"]
        assert won.any()
        assert fooled[won].all()               # the in-loop check agrees with the real model
        if lams != (0.0,):
            assert not adv["safetynet.alarm"][won].any()
        success[lams] = float((fooled & ~adv["alarm"] & correct).sum())
    assert success[(1.0, 10.0)] > success[(0.0,)]


def test_ink_support_leaves_the_background_alone(loaded, digits):
    x, y = digits.test.x[:20].numpy(), digits.test.y[:20].numpy()
    result = adaptive_attack(loaded, x, y, AdaptiveSettings(eps=0.2, steps=5), input_range=digits.input_range,
                             lams=(1.0,), supports=("ink",))
    background = x <= digits.input_range[0]
    assert background.any() and np.array_equal(result["x_adv"][background], x[background])
    assert np.abs(result["x_adv"] - x)[~background].max() > 0
    with pytest.raises(HardenError, match="support"):
        adaptive_attack(loaded, x, y, AdaptiveSettings(), input_range=digits.input_range, supports=("edges",))


@pytest.fixture
def no_ctt_surrogate(monkeypatch):
    """As if ctt-lite had no adaptive surrogate (every built-in method has one)."""
    from harden.methods.surrogates import SURROGATES
    from harden.methods import load_all  # noqa: F401

    monkeypatch.delitem(SURROGATES._entries, "ctt-lite")


def test_a_bundle_without_a_surrogate_is_refused(tiny_hardened, no_ctt_surrogate):
    with pytest.raises(HardenError, match="no adaptive attack.*ctt-lite.*safetynet"):
        surrogates_for(tiny_hardened)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_instrument_export_evaluate_adaptive(tiny_model, tmp_path):
    state, bundle, onnx_file = tmp_path / "tiny.pt", tmp_path / "sn.hardened", tmp_path / "sn.onnx"
    torch.save(tiny_model.state_dict(), state)
    made = invoke("instrument", state, "--arch", "conftest:TinyCNN", "--data", "digits", "--method", "ctt-lite",
                  "--method", "safetynet:code=binary,attacks=fgsm:eps=0.2,svm_c=2,svm_gamma=0.03,max_train=150",
                  "--policy", "k:1", "--key", "k", "--fpr", "0.05",
                  "-o", bundle, "--json")
    assert made.exit_code == 0, made.output
    config = next(m for m in json.loads(made.stdout)["manifest"]["methods"] if m["name"] == "safetynet")["config"]
    assert (config["code"], config["attacks"], config["svm"]["C"], config["svm"]["gamma"]) == \
        ("binary", ["fgsm:eps=0.2"], 2.0, 0.03)
    assert config["training"]["natural"] == 150
    assert invoke("export", bundle, "-o", onnx_file).exit_code == 0
    result = invoke("evaluate", onnx_file, "--adaptive", "--adaptive-eps", "0.2", "--limit", "10", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["adaptive"]
    assert report["methods"] == ["ctt-lite", "safetynet"] and report["n"] == 10 and report["eps"] == 0.2
    for key in ("type_i", "type_ii", "key_unknown"):
        row = report[key]
        assert 0 <= row["success"] <= min(row["fooled"], row["evaded"]) <= 1
        assert set(row["evaded_per_method"]) == {"ctt-lite", "safetynet"}


def test_cli_adaptive_on_a_bundle_without_surrogate_is_one_line(tiny_hardened, tmp_path, no_ctt_surrogate):
    path = tmp_path / "ctt.hardened"
    save_bundle(tiny_hardened, path)
    result = invoke("evaluate", path, "--adaptive", "--limit", "5")
    assert result.exit_code != 0
    assert "no adaptive attack" in result.output and "Traceback" not in result.output
