"""Bi-model decision mismatch: the second model, the head, the SVC detector, export, bundles and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TinyCNN, train_tiny
from harden.errors import HardenError
from harden.export import export_onnx
from harden.instrumentation.pipeline import instrument
from harden.bundle.archive import load_bundle, save_bundle
from harden.methods.base import MethodSpec, Options
from harden.methods.mismatch import Mismatch, MismatchHead, graph_spec, layer_sequence
from harden.export.runtime import OnnxGraph

ATTACKS = ["fgsm:eps=0.2", "pgd:eps=0.2,steps=5"]
FIXED_SVM = {"svm_c": 10.0, "svm_gamma": 0.05}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train and attack faster on one thread, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread, request):
    """conftest's session model, built here under one thread if no earlier module built it."""
    return request.getfixturevalue("tiny_model")


# fpr_confidence=0: the detection figures here are at the empirical 5% operating point (the rule of
# docs/results/mismatch.md); the order-statistic default is tested in test_calibration.py and test_nic.py
OPTIONS = Options(key="mm-key", fpr=0.05, fpr_confidence=0.0)


def mismatch(**options) -> MethodSpec:
    given = {"attacks": ATTACKS, "max_train": 800, **options}
    return MethodSpec.of("mismatch", **{k: v for k, v in given.items() if v is not None})


class SmallMLP(nn.Module):
    """A user's second model, with a buffer the forward reads."""

    def __init__(self, classes: int = 10, shape: int = 64):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.fc1 = nn.Linear(shape, 48)
        self.fc2 = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1) * self.scale)))


def export_pt2(model: nn.Module, example: torch.Tensor, path) -> str:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return str(path)


@pytest.fixture(scope="module")
def mm(tiny, digits):
    return instrument(tiny, digits, [mismatch()], OPTIONS)


@pytest.fixture(scope="module")
def mm_bundle(mm, tmp_path_factory):
    path = tmp_path_factory.mktemp("mm") / "mm.hardened"
    save_bundle(mm, path)
    return path


@pytest.fixture(scope="module")
def user_second(digits, tmp_path_factory):
    torch.manual_seed(1)
    model = train_tiny(SmallMLP(), digits.train.x, digits.train.y, epochs=15, seed=1)
    return export_pt2(model, digits.train.x[:4], tmp_path_factory.mktemp("second") / "second.pt2")


def test_trained_second_model_is_structurally_different(mm, tiny):
    config = mm.method("mismatch").config
    assert config["second_layers"] != config["classifier_layers"]
    assert config["second_layers"] == layer_sequence(mm.method("mismatch").head.second)
    assert config["classifier_layers"] == layer_sequence(tiny)
    assert config["second"]["kind"] == "mlp"  # 8x8 inputs are small
    assert config["second_source"]["from"].startswith("trained (default")
    assert config["second_test_accuracy"] > 0.8  # reported in the manifest, and a real classifier
    assert config["n_features"] == 20 and config["svm"]["support_vectors"] > 0
    assert "cv" in config["svm"]  # C and gamma from the grid when not given


def test_classifier_with_the_mlp_structure_gets_a_cnn(digits):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 320), nn.ReLU(), nn.Linear(320, 50), nn.ReLU(), nn.Linear(50, 10))
    torch.manual_seed(0)
    mlp = train_tiny(mlp, digits.train.x, digits.train.y, epochs=3)
    hardened = instrument(mlp, digits, [mismatch(max_train=200, attacks=["fgsm:eps=0.2"],
                                                             second_recipe="plain", **FIXED_SVM)], OPTIONS)
    config = hardened.method("mismatch").config
    assert config["second"]["kind"] == "cnn"
    assert config["second_layers"] != config["classifier_layers"]


def test_same_structure_is_refused(tiny, digits, tmp_path):
    torch.manual_seed(5)
    twin = TinyCNN().eval()  # the classifier's architecture, other weights
    path = export_pt2(twin, digits.train.x[:4], tmp_path / "twin.pt2")
    with pytest.raises(HardenError, match="structurally different") as info:
        instrument(tiny, digits, [mismatch(second_model=path)], OPTIONS)
    assert "\n" not in str(info.value)


def test_logits_bit_identical(mm, tiny, digits):
    x = digits.test.x
    with torch.no_grad():
        expected = tiny(x).numpy()
    assert np.array_equal(mm.run(x)["logits"], expected)


def test_head_feeds_both_models_the_same_input(mm, tiny, digits):
    head = mm.method("mismatch").head
    x = digits.test.x[:32]
    with torch.no_grad():
        logits = tiny(x)
        features = head(x, logits)
        second = torch.softmax(head.second(x), dim=1)
    assert features.shape == (32, 20) and features.dtype == torch.float32
    assert torch.equal(features[:, :10], torch.softmax(logits, dim=1))
    assert torch.equal(features[:, 10:], second)
    graph_features = mm.torch_outputs(x)["mismatch.features"]
    assert np.array_equal(graph_features, features.numpy())


def test_calibration_reaches_the_requested_fpr(mm, digits):
    metrics = mm.facts["metrics"]
    assert metrics["calibration_fpr"] <= 0.05
    assert metrics["calibration_fpr"] >= 0.05 - 2.0 / len(digits.calibration)
    assert metrics["test_fpr"] <= 0.1


def test_detects_attacks_on_the_classifier(mm, tiny, digits):
    from harden.attacks.catalog import parse_attack, run_attack

    x, y = digits.test.x[:200].numpy(), digits.test.y[:200].numpy()
    adv = run_attack(tiny, parse_attack("pgd:eps=0.2"), x, y, input_range=digits.input_range, num_classes=10)
    out = mm.run(adv)
    fooled = out["logits"].argmax(1) != y
    assert fooled.mean() > 0.5
    assert out["mismatch.alarm"][fooled].mean() > 2 * mm.facts["metrics"]["test_fpr"] + 0.2


def test_bundle_round_trip_and_onnx_parity(mm, mm_bundle, digits):
    loaded, manifest = load_bundle(mm_bundle)
    x = digits.test.x
    a, b = mm.run(x), loaded.run(x)
    assert np.array_equal(a["logits"], b["logits"])
    assert np.abs(a["mismatch.score"] - b["mismatch.score"]).max() <= 1e-4
    result = export_onnx(loaded)
    got = OnnxGraph(result.model.SerializeToString()).run(x.numpy())
    # the export's contract: within 1e-4, relative for values above 1 (harden.export.parity)
    assert np.abs(got["logits"] - a["logits"]).max() <= 1e-4 * max(1.0, np.abs(a["logits"]).max())
    assert np.abs(got["score"] - a["score"]).max() <= 1e-4 * max(1.0, np.abs(a["score"]).max())
    assert np.array_equal(got["alarm"], a["alarm"])
    assert np.array_equal(got["mismatch.alarm"], a["mismatch.alarm"])
    assert manifest["methods"][0]["config"]["second_test_accuracy"] > 0.8


def test_composes_with_ctt_lite(tiny, digits):
    hardened = instrument(tiny, digits, ["ctt-lite:mask_ratio=0.05", mismatch(max_train=400, **FIXED_SVM)],
                          Options(key="mm-key", fpr=0.05), policy="any")
    assert hardened.facts["metrics"]["calibration_fpr"] <= 0.05
    result = export_onnx(hardened)
    graph = OnnxGraph(result.model.SerializeToString())
    assert graph.output_names == ["logits", "score", "alarm", "ctt-lite.score", "ctt-lite.alarm",
                                  "mismatch.score", "mismatch.alarm"]
    x = digits.test.x.numpy()
    got, ref = graph.run(x), hardened.run(x)
    assert np.array_equal(got["alarm"], ref["alarm"])
    assert np.array_equal(got["mismatch.alarm"], ref["mismatch.alarm"])
    assert np.abs(got["mismatch.score"] - ref["mismatch.score"]).max() <= 1e-4 * max(1.0, np.abs(ref["mismatch.score"]).max())
    assert np.array_equal(ref["alarm"], ref["ctt-lite.alarm"] | ref["mismatch.alarm"])


def test_user_second_model_round_trips_through_the_bundle(tiny, digits, user_second, tmp_path):
    hardened = instrument(tiny, digits, [mismatch(second_model=user_second, max_train=400, **FIXED_SVM)], OPTIONS)
    config = hardened.method("mismatch").config
    assert config["second"] == {"kind": "graph"} and config["second_source"]["file"] == "second.pt2"
    assert config["second_test_accuracy"] > 0.7
    path = tmp_path / "user.hardened"
    save_bundle(hardened, path)
    loaded, manifest = load_bundle(path)
    x = digits.test.x
    a, b = hardened.run(x), loaded.run(x)
    assert np.array_equal(a["logits"], b["logits"])
    with torch.no_grad():
        fa = hardened.torch_outputs(x)["mismatch.features"]
        fb = loaded.torch_outputs(x)["mismatch.features"]
    assert np.array_equal(fa, fb)  # the second model came back exactly, constants included
    assert np.array_equal(a["mismatch.alarm"], b["mismatch.alarm"])
    export_onnx(loaded, tmp_path / "user.onnx", source=path)  # parity-checked
    meta = OnnxGraph(tmp_path / "user.onnx").metadata["harden.manifest"]
    assert "_second_graph" not in meta  # the graph document stays out of the ONNX metadata


def test_default_attacks_resolve_eps_auto_on_the_classifier(tiny, digits, user_second, tmp_path):
    from harden.attacks.strength import EPS_GRID, resolve_auto_eps
    from harden.methods.base import key_seed
    from harden.methods.mismatch import DEFAULT_ATTACKS

    assert DEFAULT_ATTACKS == ("fgsm:eps=auto", "pgd:eps=auto", "saltpepper")
    # attacks=None: the default attacks; a user's second model, so nothing is trained here
    hardened = instrument(tiny, digits, [mismatch(attacks=None, second_model=user_second, max_train=200,
                                                              **FIXED_SVM)], OPTIONS)
    config = hardened.method("mismatch").config
    strength = config["attack_strength"]
    eps = strength["eps"]
    assert eps in EPS_GRID   # inputs in [0, 1]: the grid fraction is the eps
    assert config["attacks"] == [f"fgsm:eps={eps:g}", f"pgd:eps={eps:g}", "saltpepper"]
    assert strength["split"] == "train" and strength["inputs"] == min(500, len(digits.train))
    # measured once, on the classifier (not the second model), on the key-seeded subset of the training split
    _, expected = resolve_auto_eps(["fgsm:eps=auto"], tiny, digits.train.x, digits.train.y,
                                   input_range=digits.input_range, num_classes=digits.num_classes,
                                   seed=key_seed("mm-key", "mismatch:auto-eps:0"))
    want = expected.to_json()
    assert eps == want["eps"] and strength["clean_accuracy"] == pytest.approx(want["clean_accuracy"])
    assert strength["fgsm_accuracy"] == pytest.approx(want["fgsm_accuracy"])
    assert config["training_set"]["per_attack"].keys() == set(config["attacks"])
    path = tmp_path / "auto.hardened"
    save_bundle(hardened, path)
    loaded, manifest = load_bundle(path)
    assert manifest["methods"][0]["config"]["attacks"] == config["attacks"]
    assert manifest["methods"][0]["config"]["attack_strength"] == strength
    x = digits.test.x
    assert np.array_equal(loaded.run(x)["mismatch.alarm"], hardened.run(x)["mismatch.alarm"])
    export_onnx(loaded)  # parity-checked


def test_wrong_input_shape_is_one_line(tiny, digits, tmp_path):
    from harden.examples.lenet import LeNet5

    path = tmp_path / "lenet.pt"
    torch.save(LeNet5().state_dict(), path)  # 28x28 inputs; digits are 8x8
    with pytest.raises(HardenError, match="input shape") as info:
        instrument(tiny, digits, [mismatch(second_model=str(path), second_arch="harden.examples.lenet:LeNet5")], OPTIONS)
    assert "\n" not in str(info.value)


def test_wrong_class_count_is_one_line(tiny, digits, tmp_path):
    path = export_pt2(SmallMLP(classes=5), digits.train.x[:4], tmp_path / "five.pt2")
    with pytest.raises(HardenError, match="5 outputs; the classifier has 10 classes") as info:
        instrument(tiny, digits, [mismatch(second_model=path)], OPTIONS)
    assert "\n" not in str(info.value)


def test_conflicting_options_are_refused(tiny, digits, user_second):
    with pytest.raises(HardenError, match="not both"):
        instrument(tiny, digits, [mismatch(second_model=user_second, train_second=True)], OPTIONS)
    with pytest.raises(HardenError, match="give second_model too"):
        instrument(tiny, digits, [mismatch(second_arch="harden.examples.lenet:LeNet5")], OPTIONS)


def test_non_finite_rows_give_finite_features(mm):
    head = mm.method("mismatch").head
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    logits = torch.tensor([[float("nan")] * 10, [0.0] * 10])
    with torch.no_grad():
        assert torch.isfinite(head(x, logits)).all()
    assert isinstance(head, MismatchHead)


def test_graph_constants_outside_the_state_dict_round_trip(digits):
    from harden.graph.trace import trace
    from harden.methods.base import load_arrays, tensor_arrays

    torch.manual_seed(2)
    gm = trace(SmallMLP())
    gm._non_persistent_buffers_set.add("scale")  # not in the state_dict: must travel in the config
    gm.scale = torch.tensor(3.0)
    assert "scale" not in gm.state_dict()
    spec = graph_spec(gm)
    assert list(spec["constants"]) == ["scale"]
    head = MismatchHead(gm)
    config = {"second": {"kind": "graph"}, "_second_graph": spec["graph"], "_second_constants": spec["constants"]}
    rebuilt = load_arrays(Mismatch.build_head(config), tensor_arrays(head))
    x = digits.test.x[:16]
    logits = torch.randn(16, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, logits), head(x, logits))


def test_degradations_flip_the_model_inside_the_input_range(tiny, digits):
    from harden.methods.mismatch import DEGRADATIONS, degrade

    x, y = digits.test.x[:60].numpy(), digits.test.y[:60].numpy()
    for kind in DEGRADATIONS:
        out, flipped = degrade(tiny, kind, x, y, seed=0, input_range=digits.input_range)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        with torch.no_grad():
            pred = tiny(torch.from_numpy(out)).argmax(1).numpy()
        assert flipped.mean() > 0.3 and np.all(pred[flipped] != y[flipped])


def test_bad_recipe_and_attack_are_one_line(tiny, digits):
    with pytest.raises(HardenError, match="second_recipe"):
        instrument(tiny, digits, [mismatch(second_recipe="magic")], OPTIONS)
    with pytest.raises(HardenError, match="attack"):
        instrument(tiny, digits, [mismatch(attacks=["nosuchattack"])], OPTIONS)


# --------------------------------------------------------------------------- defaults that transfer


def test_a_near_constant_softmax_column_is_not_blown_up_by_the_scaler():
    from harden.methods.mismatch import SCALE_FLOOR, floored_scaler

    rng = np.random.default_rng(0)
    x = rng.random((200, 4))
    x[:, 2] = 0.25 + 1e-6 * rng.random(200)   # a class the second model never predicts
    scaler = floored_scaler().fit(x)
    assert scaler.scale_[2] == SCALE_FLOOR
    np.testing.assert_allclose(scaler.scale_[[0, 1, 3]], x[:, [0, 1, 3]].std(axis=0))
    # a float32 rounding difference in that column stays a rounding difference after scaling
    moved = x.copy()
    moved[:, 2] += 2e-6
    assert np.abs(scaler.transform(moved) - scaler.transform(x)).max() < 1e-2


def test_the_second_models_fgsm_eps_follows_the_classifiers_strength(tiny, digits):
    from harden.methods.mismatch import SECOND_EPS_FRACTION

    hardened = instrument(tiny, digits, [mismatch(max_train=200, attacks=["fgsm:eps=auto"], **FIXED_SVM)], OPTIONS)
    config = hardened.method("mismatch").config
    strength = config["attack_strength"]["eps"]
    assert config["second_training"]["fgsm_eps"] == pytest.approx(SECOND_EPS_FRACTION * strength, rel=1e-5)
    assert "fell_back" not in config["second_training"]
    export_onnx(hardened)  # the float64 SVC graph keeps parity


def test_a_second_model_that_cannot_learn_under_fgsm_is_retrained_plain(tiny, digits, monkeypatch):
    import harden.methods.mismatch as mm

    real = mm._train_second
    recipes = []

    def failing_fgsm(*args, recipe=mm.DEFAULT_SECOND_RECIPE, **kwargs):
        recipes.append(recipe)
        model, facts = real(*args, recipe=recipe, **kwargs)
        if recipe == "fgsm":
            facts["holdout_accuracy"] = 0.09   # as the 32x32 colour pair's did at a too-large eps
        return model, facts

    monkeypatch.setattr(mm, "_train_second", failing_fgsm)
    hardened = instrument(tiny, digits, [mismatch(max_train=200, **FIXED_SVM)], OPTIONS)
    training = hardened.method("mismatch").config["second_training"]
    assert recipes == ["fgsm", "plain"]
    assert training["recipe"] == "plain" and training["fell_back"]["holdout_accuracy"] == 0.09
    assert training["holdout_accuracy"] > 0.5


def test_a_second_model_at_chance_is_refused(tiny, digits, monkeypatch):
    import harden.methods.mismatch as mm

    real = mm._train_second

    def at_chance(*args, **kwargs):
        model, facts = real(*args, **kwargs)
        facts["holdout_accuracy"] = 0.1
        return model, facts

    monkeypatch.setattr(mm, "_train_second", at_chance)
    with pytest.raises(HardenError, match="chance is 10.0%"):
        instrument(tiny, digits, [mismatch(max_train=200, **FIXED_SVM)], OPTIONS)


def test_second_eps_must_be_auto_or_positive(tiny, digits):
    for bad in ("big", -0.1):
        with pytest.raises(HardenError, match="second_eps"):
            instrument(tiny, digits, [mismatch(max_train=200, second_eps=bad, **FIXED_SVM)], OPTIONS)
