"""LAN (thesis section 3): the LAN loss, the head's score, logits, calibration, export parity, bundles, policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harden.bundle.archive import load_bundle, save_bundle
from harden.errors import HardenError
from harden.export import export_onnx
from harden.export.runtime import OnnxGraph
from harden.instrumentation.pipeline import instrument
from harden.methods.base import MethodSpec, Options, key_seed
from harden.methods.lan import AttentionNet, LanHead, LanOptions, Noise, Standardised, lan_loss, seeded, train_attention

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest's: tiny models run fastest on one thread

# Short trainings: the tests check the method's mechanics, not its detection quality on 8x8 digits.
QUICK = {"g_steps": 200, "f2_steps": 300, "beta": 2.0}


OPTIONS = Options(key="lan-key", fpr=0.05)


def quick(**changes) -> MethodSpec:
    return MethodSpec.of("lan", **{**QUICK, **changes})


@pytest.fixture(scope="module")
def lan(tiny_model, digits):
    return instrument(tiny_model, digits, [quick()], OPTIONS)


def test_logits_bit_identical(lan, tiny_model, digits):
    x = digits.test.x
    with torch.no_grad():
        expected = tiny_model(x).numpy()
    assert np.array_equal(lan.run(x)["logits"], expected)


def test_score_is_one_minus_f2s_probability_of_the_classifiers_class(lan, tiny_model, digits):
    head = lan.method("lan").head
    x = digits.test.x[:100]
    with torch.no_grad():
        classes = tiny_model(x).argmax(1)
        mask = head.g(x)
        probabilities = torch.softmax(head.f2(mask), dim=1)
    expected = 1.0 - probabilities[torch.arange(len(x)), classes]
    raw = lan.torch_outputs(x)["lan.raw"]
    assert raw.shape == (100,) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, expected.numpy(), atol=1e-6)
    assert mask.shape == x.shape and float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    # the thesis's rule (f2's class differs from the classifier's) is the score passing roughly 1/2
    disagree = (probabilities.argmax(1) != classes).numpy()
    assert np.all(raw[disagree] >= 0.5 - 1e-6) and disagree.sum() < len(x) / 2


def test_masks_classify_and_the_facts_are_recorded(lan, digits):
    config = lan.method("lan").config
    assert config["options"] == {**LanOptions().to_dict(), "g_steps": 200, "f2_steps": 300, "beta": 2.0}
    assert len(config["g_training"]) == 10 and config["g_training"][-1]["step"] == 200
    # f2 reads masks only, yet agrees with the classifier far above chance (10 classes) on held-out inputs
    assert config["test"]["agreement"] > 0.5
    assert 0.0 < config["mask_mean_train"] < 1.0


def test_calibration_reaches_the_requested_fpr(lan, digits):
    metrics = lan.facts["metrics"]
    calibration = metrics["calibration"]
    assert metrics["calibration_fpr"] <= 0.05
    assert calibration["alarms"] <= calibration["allowed_alarms"]
    raw = lan.torch_outputs(digits.calibration.x)["lan.raw"]
    threshold = lan.facts["thresholds"]["lan"]
    assert np.array_equal(lan.run(digits.calibration.x)["lan.alarm"], raw > np.float32(threshold))
    assert metrics["test_fpr"] <= 0.12


@pytest.fixture(scope="module")
def lan_standardised(tiny_model, digits):
    return instrument(tiny_model, digits, [quick(f2_input="standardised")], OPTIONS)


BOTH_F2_INPUTS = pytest.mark.parametrize("bundle", ["lan", "lan_standardised"])


def test_standardised_masks_reach_f2_at_unit_scale(lan_standardised, digits):
    head = lan_standardised.method("lan").head
    with torch.no_grad():
        seen = head.f2_input(head.g(digits.train.x))
    varying = head.f2_input.std.flatten() > Standardised.FLOOR   # the others are divided by the floor
    assert varying.any()
    assert seen.mean(0).flatten()[varying].abs().max() < 1e-3
    assert (seen.std(0).flatten()[varying] - 1).abs().max() < 1e-3
    assert lan_standardised.method("lan").config["options"]["f2_input"] == "standardised"


@BOTH_F2_INPUTS
def test_bundle_round_trip_and_onnx_parity(bundle, digits, tmp_path, request):
    lan = request.getfixturevalue(bundle)
    path = tmp_path / "lan.hardened"
    save_bundle(lan, path)
    loaded, _ = load_bundle(path)
    x = digits.test.x
    a, b = lan.run(x), loaded.run(x)
    assert np.array_equal(a["logits"], b["logits"])
    assert np.array_equal(a["lan.score"], b["lan.score"])
    result = export_onnx(loaded, tmp_path / "lan.onnx", source=path)   # parity-checked by export itself
    got = OnnxGraph(tmp_path / "lan.onnx").run(x.numpy())
    assert np.abs(got["logits"] - a["logits"]).max() <= 1e-4 * max(1.0, np.abs(a["logits"]).max())
    assert np.abs(got["lan.score"] - a["lan.score"]).max() <= 1e-4 * max(1.0, np.abs(a["lan.score"]).max())
    assert np.array_equal(got["lan.alarm"], a["lan.alarm"])
    assert result.parity.alarm_mismatches["lan.alarm"] == 0
    # a non-finite input alarms in the graph too
    bad = x[:2].numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    bad[1, 0, 0, 0] = np.inf
    assert got["alarm"].dtype == bool and OnnxGraph(tmp_path / "lan.onnx").run(bad)["alarm"].all()


def test_composes_with_ctt_lite_under_a_policy(tiny_model, digits):
    for policy, k in (("any", 1), ("k:2", 2)):
        hardened = instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05", quick()], OPTIONS, policy=policy)
        assert hardened.facts["metrics"]["calibration_fpr"] <= 0.05
        graph = OnnxGraph(export_onnx(hardened).model.SerializeToString())
        assert graph.output_names == ["logits", "score", "alarm", "ctt-lite.score", "ctt-lite.alarm",
                                      "lan.score", "lan.alarm"]
        x = digits.test.x.numpy()
        got, ref = graph.run(x), hardened.run(x)
        assert np.array_equal(got["alarm"], ref["alarm"]) and np.array_equal(got["lan.alarm"], ref["lan.alarm"])
        votes = ref["ctt-lite.alarm"].astype(int) + ref["lan.alarm"].astype(int)
        assert np.array_equal(ref["alarm"], votes >= k)


def test_detects_more_than_its_false_alarms(lan, tiny_model, digits):
    from harden.attacks.catalog import parse_attack, run_attack

    x, y = digits.test.x[:200].numpy(), digits.test.y[:200].numpy()
    adv = run_attack(tiny_model, parse_attack("fgsm:eps=0.2"), x, y, input_range=digits.input_range, num_classes=10)
    out = lan.run(adv)
    with torch.no_grad():
        correct = tiny_model(torch.from_numpy(x)).argmax(1).numpy() == y
    fooled = correct & (out["logits"].argmax(1) != y)
    assert fooled.sum() > 50
    assert out["lan.alarm"][fooled].mean() > 2 * lan.facts["metrics"]["test_fpr"] + 0.1


def test_the_lan_loss_lowers_on_a_short_training(tiny_model, digits):
    x = digits.train.x
    with torch.no_grad():
        labels = tiny_model(x).argmax(1)
    opts = LanOptions(g_steps=60)
    noise = Noise(opts.noise, x, digits.input_range)
    seed = 7
    eta = noise.sample(x.shape, torch.Generator().manual_seed(0))   # one fixed draw for both measurements
    before = seeded(lambda: AttentionNet(tuple(x.shape[1:]), opts.g_hidden), seed)
    g, history = train_attention(tiny_model, x, labels, noise, opts, seed)
    with torch.no_grad():
        start = lan_loss(tiny_model, before, x, labels, eta, opts.beta)
        end = lan_loss(tiny_model, g, x, labels, eta, opts.beta)
    assert float(end[0]) < 0.8 * float(start[0])
    assert history[-1]["loss"] < history[0]["loss"]
    # the classifier was frozen, not trained, and its gradient flags are as they were
    assert all(p.requires_grad for p in tiny_model.parameters()) and all(p.grad is None for p in tiny_model.parameters())
    # Eq. 8: the mask keeps x where it is 1 and puts the noise where it is 0
    with torch.no_grad():
        corrupted = lan_loss(tiny_model, torch.zeros_like, x[:3], labels[:3], eta[:3], 0.0)[1]
        assert float(corrupted) == pytest.approx(float(F.cross_entropy(tiny_model(eta[:3]), labels[:3])), rel=1e-6)


def test_the_key_and_seed_determine_the_networks(lan, tiny_model, digits):
    """g is a function of (key, seed): training it again with the key's seed gives the shipped weights bit for bit;
    another key's seed gives other weights."""
    x = digits.train.x
    with torch.no_grad():
        labels = tiny_model(x).argmax(1)
    opts = LanOptions(**QUICK)
    noise = Noise(opts.noise, x, digits.input_range)
    again, _ = train_attention(tiny_model, x, labels, noise, opts, key_seed("lan-key", "lan:g:0") % 2**63)
    shipped = lan.method("lan").head.g.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in again.state_dict().items())
    other = seeded(lambda: AttentionNet(tuple(x.shape[1:]), opts.g_hidden), key_seed("other", "lan:g:0") % 2**63)
    assert not torch.equal(other.state_dict()["layers.1.weight"], shipped["layers.1.weight"])
    assert key_seed("lan-key", "lan:g:0") != key_seed("lan-key", "lan:f2:0")


@pytest.mark.parametrize("bad, match", [
    ("beta=-1", "beta='-1' must be >= 0"),
    ("noise=pink", "noise='pink' is not one of gaussian, uniform"),
    ("g_steps=2.5", "g_steps='2.5' must be a whole number"),
    ("learning_rate=0", "learning_rate='0' must be > 0"),
    ("f2_width=wide", "f2_width='wide' is not a number"),
    ("gamma=1", "has no option 'gamma'; valid: beta, noise"),
])
def test_bad_options_are_one_line(tiny_model, digits, bad, match):
    with pytest.raises(HardenError, match=match) as info:
        instrument(tiny_model, digits, [f"lan:{bad}"], OPTIONS)
    assert "\n" not in str(info.value)


@BOTH_F2_INPUTS
def test_head_rebuilds_from_its_config(bundle, digits, request):
    lan = request.getfixturevalue(bundle)
    from harden.methods.base import METHODS, load_arrays, tensor_arrays

    method = lan.method("lan")
    rebuilt = load_arrays(METHODS.get("lan").build_head(method.config), tensor_arrays(method.head))
    assert isinstance(rebuilt, LanHead)
    x, logits = digits.test.x[:20], torch.randn(20, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, logits), method.head(x, logits))


@pytest.mark.parametrize("f2_input", ["mask", "standardised"])
def test_masks_that_do_not_carry_the_class_are_refused(tiny_model, digits, monkeypatch, f2_input):
    import harden.methods.lan as lan_module

    def one_mask_for_every_input(classifier, x, labels, noise, opts, seed, progress=None):
        g = AttentionNet(tuple(x.shape[1:]), opts.g_hidden)
        for p in g.parameters():
            torch.nn.init.zeros_(p)   # sigmoid(0): the same mask 0.5 everywhere, whatever the input
        return g.eval(), []

    monkeypatch.setattr(lan_module, "train_attention", one_mask_for_every_input)
    with pytest.raises(HardenError, match=r"chance is 10.0%.*do not carry the class") as info:
        instrument(tiny_model, digits, [quick(f2_input=f2_input)], OPTIONS)
    assert "\n" not in str(info.value)


def test_masks_learnt_by_heart_are_refused_on_the_calibration_split(tiny_model, digits, monkeypatch):
    """f2 that knows every training mask's class and answers class 0 for any other mask: full agreement on the
    training split, chance on the calibration split."""
    import harden.methods.lan as lan_module

    class ByHeart(torch.nn.Module):
        def __init__(self, masks, labels, classes):
            super().__init__()
            self.masks, self.labels, self.classes = masks.flatten(1), labels, classes

        def forward(self, masks):
            distance, nearest = torch.cdist(masks.flatten(1), self.masks).min(1)
            known = torch.where(distance < 1e-3, self.labels[nearest], torch.zeros_like(nearest))
            return F.one_hot(known, self.classes).float() * 10

    class InputAsMask(torch.nn.Module):   # distinct masks for distinct inputs
        def forward(self, x):
            return x.clamp(0, 1)

    monkeypatch.setattr(lan_module, "train_attention", lambda *args, **kwargs: (InputAsMask(), []))
    monkeypatch.setattr(lan_module, "train_mask_classifier",
                        lambda masks, labels, classes, *args, **kwargs: ByHeart(masks, labels, classes))
    with pytest.raises(HardenError, match=r"on 100.0% of the training split and \d+\.\d% of the calibration split"):
        instrument(tiny_model, digits, [quick()], OPTIONS)
