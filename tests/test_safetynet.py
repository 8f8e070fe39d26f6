"""SafetyNet: codes by hand, logits untouched, ONNX parity, calibration, composition, bundle round trip."""

import numpy as np
import onnx
import pytest
import torch

from harden.errors import HardenError
from harden.core.parity import tolerance_of
from harden.export import export_onnx
from harden.instrumentation.pipeline import instrument
from harden.bundle.archive import load_bundle, save_bundle
from harden.methods.base import MethodSpec, Options
from harden.methods.safetynet import VALUE_MERGE, CodeHead, SafetyNet, positive_quantiles
from harden.export.runtime import OnnxGraph

FPR = 0.05
# Small and fixed where the default path (PGD, cross-validated grid) is not under test: FGSM is one gradient step.
FAST = {"max_train": 240, "svm_c": 1.0, "svm_gamma": 0.05, "attacks": ["fgsm:eps=0.2"]}


OPTIONS = Options(key="sn-test", fpr=FPR)


def safetynet(**options) -> MethodSpec:
    # The paper's form (the last site) unless a test says otherwise: most tests check one site's codes by hand.
    return MethodSpec.of("safetynet", **{"layers": "last:1", **{k: v for k, v in options.items() if v is not None}})


def test_defaults_are_every_site_with_quaternary_codes(tiny_model, digits):
    from harden.graph.trace import sites

    hardened = instrument(tiny_model, digits, [MethodSpec.of("safetynet", **FAST)], OPTIONS)
    method = hardened.method("safetynet")
    assert method.sites == [n.name for n in sites(hardened.classifier)]
    assert method.config["levels"] == 3


@pytest.fixture(scope="module")
def binary(tiny_model, digits):
    return instrument(tiny_model, digits, [safetynet(code="binary", **FAST)], OPTIONS)


@pytest.fixture(scope="module")
def quaternary(tiny_model, digits):
    # The default path: the cross-validated grid picks C and gamma.
    return instrument(tiny_model, digits, [safetynet(code="quaternary", max_train=240)], OPTIONS)


# --------------------------------------------------------------------------- codes by hand


def test_binary_code_is_unit_active():
    head = CodeHead([4], 1, ["none"])
    a = torch.tensor([[0.0, 0.5, 0.0, 2.0], [1.0, 0.0, 1e-7, 0.0]])
    assert head(a).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    assert head(a).dtype == torch.float32


def test_quaternary_thresholds_are_quantiles_of_positive_values_and_codes_count_them():
    # unit 0: positives 1..5 (zeros ignored) -> 25/50/75% quantiles 2, 3, 4, each moved to the middle of the gap
    # above it (2.5, 3.5, 4.5) so no threshold sits on a value the unit takes; unit 1 is never positive -> 0, 0, 0;
    # unit 2 has a single positive value 6 -> just above it (6 + 6e-3 / 2).
    values = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 6.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0],
                           [4.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    th = positive_quantiles(values, (0.25, 0.5, 0.75))
    assert th[:, 0].tolist() == [2.5, 3.5, 4.5]
    assert th[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert th[:, 2].tolist() == pytest.approx([6.003] * 3)
    head = CodeHead([3], 3, ["none"])
    head.thresholds_0.copy_(th)
    a = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.1, 6.0], [2.6, 0.0, 6.5], [3.5, 0.0, 0.0], [4.6, 0.0, 0.0]])
    # 2.0 -> 0 levels, 2.6 -> 1, 3.5 -> 1 (strictly above only), 4.6 -> 3; 0.1 > 0 three times; 6.0 -> 0, 6.5 -> 3.
    assert head(a).tolist() == [[0, 0, 0], [0, 3, 0], [1, 0, 3], [1, 0, 0], [3, 0, 0]]


def test_thresholds_never_sit_on_a_value_the_unit_takes():
    # A unit that sees a blank patch outputs relu(bias) for most inputs: quantiles land on that very value.
    values = torch.tensor([[0.25]] * 6 + [[0.5], [1.0]])
    th = positive_quantiles(values, (0.25, 0.5, 0.75))[:, 0]
    assert not any(bool((values == t).any()) for t in th)
    assert th.tolist() == [0.375, 0.375, 0.375]  # every observed 0.25 codes 0, 0.5 and 1.0 code 3


def test_thresholds_stay_clear_of_values_within_float_rounding_of_each_other():
    # A blank patch seen through slightly different neighbours: one value, and another 6e-8 above it.  A midpoint
    # between the two would sit inside the torch / onnxruntime rounding difference.
    mass, near = 0.923353791, 0.92335385
    values = torch.tensor([[mass]] * 6 + [[near], [1.5], [2.0]])
    th = positive_quantiles(values, (0.25, 0.5, 0.75))[:, 0]
    for t in th.tolist():
        assert min(abs(t - v) for v in (mass, near, 1.5, 2.0)) > VALUE_MERGE / 4
    assert th[0].item() == pytest.approx((near + 1.5) / 2)  # both near-equal values code 0


def test_a_ramp_moves_a_code_by_a_fraction_near_its_threshold():
    head = CodeHead([2], 2, ["none"], ramps=[0.1])
    head.thresholds_0.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    a = torch.tensor([[1.05, 0.0], [2.5, 0.02], [0.5, float("nan")], [float("inf"), -1.0]])
    # NaN stays NaN (the score is NaN and alarms); inf exceeds every level
    np.testing.assert_allclose(head(a).numpy(), [[0.5, 0.0], [2.0, 0.4], [0.0, np.nan], [2.0, 0.0]], atol=1e-6)
    step = CodeHead([2], 2, ["none"])  # bundles without ramps keep the paper's step
    step.thresholds_0.copy_(head.thresholds_0)
    assert step(a).tolist() == [[1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [2.0, 0.0]]


def test_conv_sites_reduce_per_channel_before_coding():
    a = torch.zeros(2, 2, 3, 3)
    a[0, 0, 1, 1] = 5.0   # sample 0, channel 0: max 5, mean 5/9
    a[1, 1] = 1.0         # sample 1, channel 1: max 1, mean 1
    for how, expected in (("max", [[2.0, 0.0], [0.0, 1.0]]), ("mean", [[0.0, 0.0], [0.0, 1.0]])):
        head = CodeHead([2], 1, [how])
        head.thresholds_0.copy_(torch.tensor([[0.6, 0.5]]))
        codes = head(a) * torch.tensor([2.0, 1.0])  # weights just to tell channels apart
        assert codes.tolist() == expected, how
    flat = CodeHead([18], 1, ["none"])
    assert flat(a).shape == (2, 18) and flat(a).sum().item() == 10


def test_grid_reduction_is_ceil_mode_max_pooling_and_exports_exactly():
    from harden.export.torch_graph import export_module
    from harden.methods.safetynet import reduction_plan

    shapes, kernels = [(16, 10, 10), (8, 5, 7), (4, 9)], [3, 2, 3]
    plans = [reduction_plan(shape, "grid", 4) for shape in shapes]
    assert [(how, k) for how, k, _ in plans] == [("grid", k) for k in kernels]
    assert [dim for *_, dim in plans] == [16 * 16, 8 * 3 * 4, 4 * 3]
    head = CodeHead([dim for *_, dim in plans], 3, ["grid"] * 3, kernels).eval()
    torch.manual_seed(0)
    for i, (*_, dim) in enumerate(plans):
        getattr(head, f"thresholds_{i}").copy_(torch.rand(3, dim).sort(0).values)
    xs = [torch.relu(torch.randn(5, *shape)) for shape in shapes]
    for i, (x, k) in enumerate(zip(xs, kernels)):
        pool = torch.nn.functional.max_pool2d if x.dim() == 4 else torch.nn.functional.max_pool1d
        assert torch.equal(head.reduced(i, x), pool(x, k, ceil_mode=True).flatten(1))
    graph = export_module(head, tuple(x[:2] for x in xs), ["a", "b", "c"], ["f"], varargs_after=0)
    got = OnnxGraph(graph.SerializeToString()).session.run(None, {n: x.numpy() for n, x in zip("abc", xs)})[0]
    assert np.array_equal(got, head(*xs).numpy())


def test_the_grid_shrinks_until_the_codes_fit_the_feature_budget():
    from harden.methods.safetynet import budgeted_plans, reduction_plan

    shapes = [(64, 8, 8), (128, 4, 4), (512, 1, 1)]   # at grid 4: 1024 + 2048 + 512 = 3584 features
    plans, used = budgeted_plans(shapes, "grid", 4, 3584)
    assert used == 4 and plans == [reduction_plan(s, "grid", 4) for s in shapes]
    plans, used = budgeted_plans(shapes, "grid", 4, 3583)   # grid 3: 64*9 + 128*4 + 512 = 1600
    assert used == 3 and sum(p[2] for p in plans) == 1600
    plans, used = budgeted_plans(shapes, "grid", 4, 1000)   # grid 1: 64 + 128 + 512 = 704
    assert used == 1 and [p[1] for p in plans] == [8, 4, 1] and sum(p[2] for p in plans) == 704
    plans, used = budgeted_plans(shapes, "grid", 4, 10)     # nothing fits: one cell per channel stands
    assert used == 1 and sum(p[2] for p in plans) == 704
    plans, used = budgeted_plans(shapes, "max", 4, 10)      # only the grid reduction is budgeted
    assert used == 4 and sum(p[2] for p in plans) == 704


def test_a_model_over_the_feature_budget_is_coded_on_a_coarser_grid(tiny_model, digits):
    wide = instrument(tiny_model, digits, [safetynet(layers="all", **FAST)], OPTIONS).method("safetynet").config
    assert wide["grid"]["used"] == 4 and wide["features"] <= wide["grid"]["max_features"]
    budget = wide["features"] - 1
    narrow = instrument(tiny_model, digits, [safetynet(layers="all", max_features=budget, **FAST)], OPTIONS)
    config = narrow.method("safetynet").config
    assert config["grid"] == {"asked": 4, "used": config["grid"]["used"], "max_features": budget}
    assert config["grid"]["used"] < 4 and config["features"] < wide["features"]
    assert narrow.method("safetynet").detector.n_features == config["features"]
    result = export_onnx(narrow)   # raises on a parity failure; alarms compared exactly
    assert not any(result.parity.alarm_mismatches.values())


def test_wide_codes_get_fewer_support_vectors_under_the_cost_budget(tiny_model, digits):
    free = instrument(tiny_model, digits, [safetynet(layers="all", **FAST)], OPTIONS).method("safetynet").config
    features, fitted = free["features"], free["svm"]["support_vectors"]
    assert free["svm"]["max_support_vectors"] == 500 and fitted > 10
    cost = features * (fitted // 2)   # room for half the support vectors the SVM wants
    capped = instrument(tiny_model, digits, [safetynet(layers="all", max_svm_cost=cost, **FAST)], OPTIONS)
    config = capped.method("safetynet").config
    assert config["svm"]["max_support_vectors"] == fitted // 2 and config["svm"]["max_svm_cost"] == cost
    assert config["svm"]["support_vectors"] * features <= cost
    assert not any(export_onnx(capped).parity.alarm_mismatches.values())


def test_build_head_rebuilds_the_fitted_shapes(binary, quaternary):
    for hardened in (binary, quaternary):
        method = hardened.method("safetynet")
        rebuilt = SafetyNet.build_head(method.config)
        rebuilt.load_state_dict(method.head.state_dict())
        x = torch.rand(3, 32)
        assert torch.equal(rebuilt(x), method.head(x))


def test_codes_on_the_model_match_the_activations(binary, quaternary, tiny_model, digits):
    from harden.graph.analyse import feature_extractor

    x = digits.test.x[:50]
    for hardened in (binary, quaternary):
        method = hardened.method("safetynet")
        (site,) = method.sites
        with torch.no_grad():
            _, act = feature_extractor(hardened.classifier, [site])(x)
        th = method.head.thresholds_0
        ramp = method.head.ramps[0]
        assert 0 < ramp < 0.05 * float(act.max())
        above = act[:, None, :] - th[None]
        expected = (above / ramp).clamp(0, 1).sum(1)
        got = hardened.torch_outputs(x)["safetynet.features"]
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
        assert got.max() <= th.shape[0]
        # away from the narrow ramps the codes are the step's whole levels
        clear = ((above <= 0) | (above >= ramp)).all(1).numpy()
        assert clear.mean() > 0.9
        assert np.array_equal(got[clear], (above > 0).sum(1).float().numpy()[clear])


# --------------------------------------------------------------------------- contract


def test_logits_are_bit_identical(binary, quaternary, tiny_model, digits):
    x = digits.test.x
    with torch.no_grad():
        want = tiny_model(x).numpy()
    for hardened in (binary, quaternary):
        assert np.array_equal(hardened.run(x)["logits"], want)


def test_onnx_parity(binary, digits):
    hardened = binary
    result = export_onnx(hardened)
    assert result.parity.alarm_mismatches["safetynet.alarm"] == 0
    graph = OnnxGraph(result.model.SerializeToString())
    x = digits.test.x.numpy()
    got, ref = graph.run(x), hardened.run(x)
    assert np.abs(got["safetynet.score"] - ref["safetynet.score"]).max() <= 1e-4
    assert np.array_equal(got["safetynet.alarm"], ref["safetynet.alarm"])
    assert np.array_equal(got["alarm"], ref["alarm"])
    for batch in (1, 5):
        assert graph.run(x[:batch])["safetynet.score"].shape == (batch,)
    bad = x[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    assert graph.run(bad)["alarm"][0]


def test_calibration_reaches_the_requested_fpr(binary, quaternary, digits):
    for hardened in (binary, quaternary):
        cal = hardened.run(digits.calibration.x)
        achieved = float(cal["safetynet.alarm"].mean())
        assert achieved <= FPR
        assert achieved == pytest.approx(hardened.facts["metrics"]["calibration_fpr"])
        # Codes are discrete, so scores tie; the threshold still sits as low as the ties allow: one step lower
        # would let more calibration inputs alarm than the order-statistic rule allows
        allowed = hardened.facts["metrics"]["calibration"]["allowed_alarms"]
        assert cal["safetynet.alarm"].sum() <= allowed
        scores = np.sort(cal["safetynet.score"])[::-1]
        next_up = scores[cal["safetynet.alarm"].sum()]  # the highest score left below the threshold
        assert int((cal["safetynet.score"] >= next_up).sum()) > allowed


def test_detector_separates_fresh_adversarial_examples(quaternary, tiny_model, digits):
    from sklearn.metrics import roc_auc_score

    from harden.attacks.catalog import parse_attack, run_attack

    # Test inputs the detector never saw, attacked as in training (the default PGD at eps=auto, about 0.1 here).
    # The tiny 8x8 model's last site (32 units) is a weak place for SafetyNet (AUC ~0.79 here; LeNet-5 numbers in
    # docs/results/safetynet.md).
    (trained_on,) = quaternary.method("safetynet").config["attacks"]
    x, y = digits.test.x[:150].numpy(), digits.test.y[:150].numpy()
    adv = run_attack(tiny_model, parse_attack(trained_on), x, y, input_range=digits.input_range,
                     num_classes=digits.num_classes, seed=1)
    out_adv, out_nat = quaternary.run(adv), quaternary.run(x)
    correct = out_nat["logits"].argmax(1) == y
    scores = np.r_[out_nat["safetynet.score"], out_adv["safetynet.score"][correct]]
    auc = roc_auc_score(np.r_[np.zeros(len(x)), np.ones(correct.sum())], scores)
    assert auc > 0.7
    assert out_adv["safetynet.alarm"][correct].mean() > 2 * FPR


def test_manifest_facts(binary, quaternary, digits):
    from harden.attacks.strength import EPS_GRID
    from harden.attacks.catalog import parse_attack

    assert binary.method("safetynet").config["attacks"] == ["fgsm:eps=0.2"]
    assert binary.method("safetynet").config["attack_strength"] is None   # a numeric eps was given
    # The default, pgd:eps=auto, is recorded with the eps it resolved to: a grid value (inputs in [0, 1]) at which
    # FGSM roughly halves the model's accuracy on at most 500 training inputs.
    config = quaternary.method("safetynet").config
    (attack,) = config["attacks"]
    spec = parse_attack(attack)
    assert spec.name == "pgd" and set(spec.params) == {"eps"}
    strength = config["attack_strength"]
    assert spec.params["eps"] == strength["eps"] and strength["eps"] in EPS_GRID
    assert strength["split"] == "train" and strength["inputs"] == min(500, len(digits.train))
    assert strength["fgsm_accuracy"][f"{strength['eps']:g}"] < strength["clean_accuracy"]
    for hardened, code in ((binary, "binary"), (quaternary, "quaternary")):
        config = hardened.method("safetynet").config
        assert config["code"] == code
        assert config["sites"] == ["relu_1"]  # the last ReLU site by default
        assert config["svm"]["support_vectors"] >= 1
        training = config["training"]
        assert training["natural"] == 240 and 0 < training["adversarial"] <= 240
    assert binary.method("safetynet").config["svm"]["C"] == 1.0


# --------------------------------------------------------------------------- composition and bundles


@pytest.mark.parametrize("policy", ["any", "majority"])
def test_composition_with_ctt_lite_and_several_sites(policy, tiny_model, digits):
    methods = ["ctt-lite:mask_ratio=0.1", safetynet(**{**FAST, "layers": "last:2", "max_train": 160, "max_sv": 60})]
    hardened = instrument(tiny_model, digits, methods, OPTIONS, policy=policy)
    x = digits.test.x
    out = hardened.run(x)
    with torch.no_grad():
        assert np.array_equal(out["logits"], tiny_model(x).numpy())
    assert hardened.facts["metrics"]["calibration_fpr"] <= FPR
    both = out["ctt-lite.alarm"] & out["safetynet.alarm"]
    either = out["ctt-lite.alarm"] | out["safetynet.alarm"]
    assert np.array_equal(out["alarm"], either if policy == "any" else both)
    # several sites: the conv site [16, 2, 2] is max-pooled to at most 4 x 4 cells per channel (here every cell)
    # and concatenated with the last site's 32 units; the support-vector budget holds
    config = hardened.method("safetynet").config
    assert config["sites"] == ["relu", "relu_1"]
    assert config["reduce"] == ["grid", "none"] and config["dims"] == [64, 32]
    assert hardened.torch_outputs(x[:4])["safetynet.features"].shape == (4, 96)
    assert config["svm"]["support_vectors"] <= 60 < config["svm"]["support_vectors_before_budget"]
    result = export_onnx(hardened)
    got = OnnxGraph(result.model.SerializeToString()).run(x.numpy())
    assert np.array_equal(got["alarm"], out["alarm"])
    assert np.abs(got["score"] - out["score"]).max() <= 1e-4


def test_bundle_round_trip_and_parity(quaternary, digits, tmp_path):
    path = tmp_path / "sn.hardened"
    save_bundle(quaternary, path)
    loaded, manifest = load_bundle(path)
    x = digits.test.x
    a, b = quaternary.run(x), loaded.run(x)
    assert np.array_equal(a["logits"], b["logits"])
    assert np.array_equal(a["safetynet.alarm"], b["safetynet.alarm"])
    assert np.abs(a["safetynet.score"] - b["safetynet.score"]).max() <= 1e-4
    entry = next(m for m in manifest["methods"] if m["name"] == "safetynet")
    assert entry["config"]["code"] == "quaternary"
    config = quaternary.method("safetynet").config
    assert entry["config"]["attacks"] == config["attacks"] and "auto" not in config["attacks"][0]
    assert entry["config"]["attack_strength"] == config["attack_strength"]
    result = export_onnx(loaded)
    assert result.parity.alarm_mismatches["alarm"] == 0
    got = OnnxGraph(result.model.SerializeToString()).run(x.numpy())
    # export parity's rule: 1e-4 of the score's magnitude (a float32 sum rounds at the scale of what it sums)
    assert np.abs(got["safetynet.score"] - a["safetynet.score"]).max() <= tolerance_of(a["safetynet.score"])
    assert np.array_equal(got["safetynet.alarm"], a["safetynet.alarm"])


# --------------------------------------------------------------------------- sites and options


def test_user_given_eps_auto_is_resolved_once_and_numeric_eps_kept(tiny_model, digits):
    extra = {**FAST, "max_train": 120, "attacks": ["fgsm:eps=auto", "fgsm:eps=0.2", "bim:eps=auto,steps=3"]}
    config = instrument(tiny_model, digits, [safetynet(**extra)], OPTIONS).method("safetynet").config
    eps = config["attack_strength"]["eps"]
    assert config["attacks"] == [f"fgsm:eps={eps:g}", "fgsm:eps=0.2", f"bim:eps={eps:g},steps=3"]


@pytest.mark.parametrize("extra, message", [
    ({"code": "ternary"}, "code='ternary' is not one of binary, quaternary"),
    ({"attacks": ["pgd:eps=autox"]}, "eps"),
    ({"max_train": 0}, "max_train=0 must be >= 1"),
    ({"svm_c": -1.0}, "svm_c=-1.0 must be > 0"),
    ({"attacks": ["nosuch"]}, "nosuch"),
    ({"reduce": "median"}, "reduce"),
    ({"ramp": 1.5}, "ramp"),
])
def test_bad_options_are_one_line_errors(extra, message, tiny_model, digits):
    with pytest.raises(HardenError, match=message):
        instrument(tiny_model, digits, [safetynet(**extra)], OPTIONS)


# --------------------------------------------------------------------------- the SVM graph


@pytest.mark.parametrize("scaler", [False, True])
def test_dense_svm_graph_matches_sklearn_and_skl2onnx(scaler):
    # SafetyNet ships the SVC as dense ONNX algebra (one MatMul against the support vectors) instead of skl2onnx's
    # SVMClassifier, which onnxruntime evaluates pair by pair; both must give scikit-learn's decision function.
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from harden.detectors.sklearn_onnx import SklearnDetector
    from harden.methods.safetynet import RbfSvmDetector

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (300, 40)).astype(np.float32)
    labels = (codes[:, :5].sum(1) + rng.normal(0, 2, 300) > 7.5).astype(int)
    svc = SVC(C=10.0, gamma=0.02)
    estimator = make_pipeline(StandardScaler(), svc).fit(codes, labels) if scaler else svc.fit(codes, labels)
    dense = RbfSvmDetector(estimator, "safetynet", 40)
    assert dense.exact_int is not scaler
    reference = SklearnDetector(estimator, "safetynet", 40, column=1)
    test = rng.integers(0, 4, (200, 40)).astype(np.float32)
    want = estimator.decision_function(test)
    got_dense = OnnxGraph(dense.onnx_model()).session.run(None, {"safetynet.features": test})[0]
    got_skl = OnnxGraph(reference.onnx_model()).session.run(None, {"safetynet.features": test})[0]
    assert np.abs(got_dense - want).max() <= 1e-5
    assert np.abs(got_skl - want).max() <= 1e-3   # skl2onnx runs the kernel sum in float32
    assert np.array_equal(dense.score(test), want.astype(np.float32))
    # a NaN code (a site value that was NaN) gives a NaN score in both, which the policy counts as an alarm
    test[[3, 7], [0, 39]] = np.nan
    got_nan = OnnxGraph(dense.onnx_model()).session.run(None, {"safetynet.features": test})[0]
    assert np.isnan(got_nan).nonzero()[0].tolist() == [3, 7] == np.isnan(dense.score(test)).nonzero()[0].tolist()


def test_head_joins_the_ramps_keeps_nan_and_skips_unit_pools():
    # one ramp chain over every site's values and no 1 x 1 max pool: the same codes as site by site and level by
    # level, NaN exactly where the value is NaN, and the same in onnxruntime
    torch.manual_seed(0)
    dims = [64 * 4, 128, 32]
    head = CodeHead(dims, 3, ["grid", "grid", "none"], [2, 1, 1], ramps=[1e-3, 2.3e-3, 0.0371]).eval()
    for i, d in enumerate(dims):
        getattr(head, f"thresholds_{i}").copy_(torch.sort(torch.rand(3, d), dim=0).values)
    acts = [torch.rand(50, 64, 4, 4), torch.rand(50, 128, 1, 1), torch.rand(50, 32)]
    acts[0][3, 2, 1, 1] = float("nan")
    acts[1][4, 5] = float("inf")
    acts[2][7, 3] = -float("inf")
    acts[2][:10] = head.thresholds_2[1] + torch.rand(10, 32) * 0.05   # inside the ramps: fractional codes

    def per_level(i, a):
        pooled = a if head.kernels[i] == 1 else torch.nn.functional.max_pool2d(a, 2, stride=2, ceil_mode=True)
        ramp = torch.clamp((pooled.flatten(1).unsqueeze(1) - getattr(head, f"thresholds_{i}")) / head.ramps[i], 0, 1)
        return ramp.sum(dim=1)

    want = torch.cat([per_level(i, a) for i, a in enumerate(acts)], dim=1)
    got_torch = head(*acts)
    torch.testing.assert_close(got_torch, want, rtol=0, atol=0, equal_nan=True)
    assert bool(((want % 1) != 0).any())
    assert torch.isnan(want).nonzero().tolist() == [[3, 2 * 4 + 0]]   # channel 2, the 2 x 2 cell holding (1, 1)
    from harden.export.torch_graph import export_module

    model = export_module(head, tuple(a[:2] for a in acts), [f"a{i}" for i in range(3)], ["codes"], varargs_after=0)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MaxPool") == 1 and "Expand" not in ops
    got = OnnxGraph(model.SerializeToString()).session.run(None, {f"a{i}": a.numpy() for i, a in enumerate(acts)})[0]
    np.testing.assert_array_equal(got, want.numpy())


def test_centred_float32_svm_graph_matches_sklearn_on_codes_with_ramp_fractions():
    # SafetyNet's SVM graph takes x.s and |x|^2 in float32 around integer centres (a float64 MatMul over a
    # ResNet-18's 19,456 code features cost more than the classifier): on integer codes with a few fractional
    # ones (values within a ramp above a threshold) and many features it must stay at the float64 graph's
    # distance from scikit-learn, far inside export parity's 1e-4, and give the same alarms at any threshold.
    from sklearn.svm import SVC

    from harden.methods.safetynet import RbfSvmDetector

    rng = np.random.default_rng(0)
    d = 3000

    def codes(n, shift):
        x = rng.integers(0, 4, (n, d)).astype(np.float32)
        x[:, :300] = np.clip(x[:, :300] + shift * rng.integers(0, 2, (n, 300)), 0, 3)
        frac = rng.random((n, d)) < 0.005
        x[frac] = np.clip(np.floor(x[frac]) + rng.random(int(frac.sum())).astype(np.float32), 0, 3)
        return x

    x = np.concatenate([codes(150, 0), codes(150, 1)])
    y = np.r_[np.zeros(150, dtype=int), np.ones(150, dtype=int)]
    svc = SVC(C=10.0, gamma=1.0 / (d * x.var())).fit(x, y)
    test = np.concatenate([codes(100, 0), codes(100, 1)])
    want = svc.decision_function(test)
    scores = {}
    for centred in (False, True):
        dense = RbfSvmDetector(svc, "safetynet", d, exact_int=False, centred=centred)
        model = onnx.load_from_string(dense.onnx_model())
        ops = [n.op_type for n in model.graph.node]
        product = next(n for n in model.graph.node if n.op_type == "MatMul")
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert (inits["svm_sv_t"] == onnx.TensorProto.FLOAT) is centred   # the [D, S] product in float32
        assert ops.count("MatMul") == 2 and product.input[0].endswith("xc" if centred else "z")
        scores[centred] = OnnxGraph(dense.onnx_model()).session.run(None, {"safetynet.features": test})[0]
        assert np.abs(scores[centred] - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    for threshold in np.quantile(want, [0.1, 0.5, 0.9]):
        assert np.array_equal(scores[True] > threshold, want.astype(np.float32) > threshold)
    # the adaptive attack reads the support vectors back from the graph's constants, centred or not
    from harden.methods.safetynet_adaptive import svm_parameters

    params = svm_parameters(RbfSvmDetector(svc, "safetynet", d, exact_int=False, centred=True))
    np.testing.assert_array_equal(params["sv_t"].numpy(), svc.support_vectors_.T)


def test_support_vector_budget_refits_on_fewer_examples():
    from sklearn.svm import SVC

    from harden.methods.safetynet import support_vectors, within_budget

    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (400, 20)).astype(np.float32)
    y = rng.integers(0, 2, 400)   # random labels: nearly every example is a support vector
    svc = SVC(C=1.0, gamma=0.05).fit(x, y)
    assert support_vectors(svc) > 150
    small, used = within_budget(svc, x, y, 150, seed=0)
    assert support_vectors(small) <= 150 and used < 400
    assert small.C == svc.C and small.gamma == svc.gamma


def test_grid_ties_go_to_the_fewest_support_vectors():
    from sklearn.svm import SVC

    from harden.methods.safetynet import fit_svm, support_vectors

    rng = np.random.default_rng(2)
    natural = rng.integers(0, 2, (150, 30)).astype(np.float32)
    adversarial = natural.copy()
    adversarial[:, :10] = 3.0   # far apart: every grid point separates them perfectly
    x = np.concatenate([natural, adversarial])
    y = np.r_[np.zeros(150, int), np.ones(150, int)]
    chosen = fit_svm(x, y, seed=0)
    # every grid point reaches CV AUC 1; the chosen one has the fewest support vectors of them all
    gamma_base = 1.0 / (x.shape[1] * float(np.var(x)))   # the rule fit_svm uses
    counts = [support_vectors(SVC(C=c, gamma=f * gamma_base).fit(x, y)) for c in (0.1, 1.0, 10.0, 100.0)
              for f in (0.1, 0.3, 1.0, 3.0)]
    assert support_vectors(chosen) == min(counts) < max(counts)


def test_safetynet_graph_agrees_at_every_onnxruntime_level_and_as_portable_float32(quaternary):
    from portability import check_every_runtime_setting

    check_every_runtime_setting(quaternary)
