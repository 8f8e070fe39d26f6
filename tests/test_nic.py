"""NIC (paper 002): trained probes, invariants that flag out-of-distribution inputs, exact logits, ONNX parity,
calibration, composition, bundle round trip and keyed randomisation — on the tiny digits CNN."""

import numpy as np
import onnx
import pytest
import torch

from harden.errors import HardenError
from harden.export import export_onnx
from harden.instrumentation.pipeline import instrument
from harden.bundle.archive import load_bundle, save_bundle
from harden.methods.base import Options
from harden.methods.nic import layout
from harden.export.runtime import OnnxGraph


def rel_diff(a, b) -> float:
    """The export parity check's measure: absolute below 1, relative above."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(a))).max())


@pytest.fixture(scope="module")
def nic(tiny_model, digits):
    return instrument(tiny_model, digits, ["nic"], Options(key="nic-test", fpr=0.05))


@pytest.fixture(scope="module")
def nic_voting(tiny_model, digits):
    return instrument(tiny_model, digits, ["nic:detectors=3"], Options(key="nic-test"))


@pytest.fixture(scope="module")
def exported(nic):
    return export_onnx(nic)


def test_sites_default_to_every_relu(nic):
    method = nic.method("nic")
    assert len(method.sites) == 3
    assert method.head_inputs == method.sites + ["@logits"]
    # a value invariant per site; a provenance one per pair of consecutive derived models, the classifier's own
    # softmax closing the chain (3 probes + the output = 3 pairs)
    assert method.config["parts_per_set"] == [3 + 3]


def test_last_derived_model_is_the_classifier(nic, tiny_model, digits):
    method = nic.method("nic")
    features = nic.torch_outputs(digits.test.x)["nic.features"]
    (entry,) = layout(method.config)
    assert len(entry["probe"]) == len(method.sites) + 1
    a, b = entry["probe"][-1]
    with torch.no_grad():
        expected = torch.softmax(tiny_model(digits.test.x), dim=1).numpy()
    np.testing.assert_allclose(features[:, a:b], expected, atol=1e-6)


def test_without_the_output_probe(tiny_model, digits):
    hardened = instrument(tiny_model, digits, ["nic:output_probe=false"], Options(key="nic-test"))
    method = hardened.method("nic")
    assert method.head_inputs == method.sites
    assert method.config["parts_per_set"] == [3 + 2]
    assert export_onnx(hardened).parity.alarm_mismatches["nic.alarm"] == 0


def test_probes_are_trained_and_beat_chance(nic, digits):
    """The derived models must be trained: measured on the test split through the head's own softmax outputs."""
    method = nic.method("nic")
    features = nic.torch_outputs(digits.test.x)["nic.features"]
    (entry,) = layout(method.config)
    probes = entry["probe"][: len(method.sites)]  # the last one is the classifier's own softmax
    accuracies = [float((features[:, a:b].argmax(1) == digits.test.y.numpy()).mean()) for a, b in probes]
    chance = 1.0 / 10
    assert min(accuracies) > 3 * chance, accuracies
    assert accuracies[-1] > 0.85, accuracies  # the last site's probe is nearly the classifier
    assert all(a > 3 * chance for a in method.config["probe_accuracy"][0])


def test_logits_are_bit_identical(nic, tiny_model, digits):
    x = digits.test.x
    with torch.no_grad():
        expected = tiny_model(x).numpy()
    assert np.array_equal(nic.run(x)["logits"], expected)


def test_out_of_distribution_inputs_score_higher(nic, digits):
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(40, *digits.input_shape, generator=gen)
    constant = torch.ones(10, *digits.input_shape)
    clean = nic.run(digits.test.x)["nic.score"]
    odd = nic.run(torch.cat([noise, constant]))
    assert np.quantile(clean, 0.95) < odd["nic.score"].min()
    assert odd["nic.alarm"].all()


@pytest.mark.parametrize("invariants, parts", [("value", 3), ("provenance", 3)])
def test_each_invariant_kind_alone(tiny_model, digits, invariants, parts):
    hardened = instrument(tiny_model, digits, [f"nic:invariants={invariants}"], Options(key="nic-test"))
    method = hardened.method("nic")
    assert method.config["parts_per_set"] == [parts]
    assert method.config["value"] == (invariants == "value")
    noise = torch.rand(30, *digits.input_shape, generator=torch.Generator().manual_seed(1))
    clean = hardened.run(digits.test.x)["nic.score"]
    assert np.median(hardened.run(noise)["nic.score"]) > np.quantile(clean, 0.95)
    # the Table III ablation bundles export too (value-only used to fail the parity check on LeNet-5)
    result = export_onnx(hardened)
    assert result.parity.abs_diff["nic.score"] <= 1e-4
    assert result.parity.alarm_mismatches["nic.alarm"] == 0


def test_g_is_a_keyed_floor_or_ceil_staircase(nic):
    # away from the ramps, g(z) = floor(z * scale) / scale or ceil(z * scale) / scale, per feature
    head = nic.method("nic").head
    scale, ceil = head.scale_0_0, head.ceil_0_0
    assert ceil.any() and (~ceil).any()
    z = torch.randn(500, len(scale), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v = (z.float() * scale).double()
    frac = v - torch.floor(v)
    flat = torch.where(ceil, frac > head.ramp, frac < 1 - head.ramp) & (frac > 0)
    expected = torch.where(ceil, torch.ceil(v), torch.floor(v)) / scale.double()
    got = head.g(0, 0, z).double()
    assert flat.float().mean() > 0.5
    torch.testing.assert_close(got[flat], expected[flat], rtol=1e-6, atol=1e-6)
    assert (got[~flat] - expected[~flat]).abs().max() <= 1.0 / float(scale.min())  # within the ramp's step


def test_head_reduces_and_standardises_in_float64(nic, digits):
    # The float32 mean of a low-variance channel, standardised and through g's ramp, broke export parity on
    # LeNet-5; the head works in float64 up to g and emits float32.
    method = nic.method("nic")
    head = method.head
    spatial = head.spatial.index(True)
    activation = torch.rand(4, head.dims[spatial], 5, 5)
    assert head.reduce(spatial, activation).dtype == torch.float64
    assert head.standardised(spatial, activation).dtype == torch.float64
    assert head.g(0, spatial, head.standardised(spatial, activation)).dtype == torch.float32
    assert nic.torch_outputs(digits.test.x[:4])["nic.features"].dtype == np.float32


def test_calibration_reaches_the_requested_fpr(nic, digits):
    metrics = nic.facts["metrics"]
    n = len(digits.calibration)
    assert metrics["calibration_fpr"] <= 0.05
    # as many calibration alarms as the order-statistic rule allows, within 2 (as close as the scores allow)
    cal = metrics["calibration"]
    assert cal["allowed_alarms"] - 2 <= cal["alarms"] == round(metrics["calibration_fpr"] * n) <= cal["allowed_alarms"]
    alarms = nic.run(digits.calibration.x)["nic.alarm"]
    assert alarms.mean() == pytest.approx(metrics["calibration_fpr"])


def test_onnx_parity_through_export(nic, exported, digits):
    assert exported.parity.alarm_mismatches["nic.alarm"] == 0
    assert exported.parity.abs_diff["nic.score"] <= 1e-4
    graph = OnnxGraph(exported.model.SerializeToString())
    x = np.concatenate([digits.test.x.numpy(), np.random.default_rng(2).random((20, *digits.input_shape), dtype=np.float32)])
    got, ref = graph.run(x), nic.run(x)
    assert rel_diff(ref["nic.score"], got["nic.score"]) <= 1e-4
    assert np.array_equal(got["nic.alarm"], ref["nic.alarm"])
    assert np.abs(got["logits"] - ref["logits"]).max() <= 1e-4


def test_transform_g_is_in_the_exported_graph(exported):
    ops = {n.op_type for n in exported.model.graph.node}
    assert {"Floor", "Slice", "Concat"} <= ops  # g: ceil features are floor features with a negated scale
    assert {"MatMul", "Exp"} <= ops  # the one-class SVMs as dense algebra (harden.detectors.dense_rbf) ...
    domains = {n.domain for n in exported.model.graph.node}
    assert "ai.onnx.ml" not in domains  # ... not skl2onnx's float32 SVM operator


def test_dense_svm_graph_matches_sklearn_and_skl2onnx(nic, digits):
    # NIC's one-class SVMs are written as float64 ONNX algebra instead of skl2onnx's float32 operator (faster and
    # closer to scikit-learn, see harden/detectors/dense_rbf.py); both graphs must give scikit-learn's score.
    from harden.detectors.nic_onnx import build_composite

    detector = nic.method("nic").detector
    features = nic.torch_outputs(digits.test.x)["nic.features"]
    noise = np.random.default_rng(3).normal(0, 2, features.shape).astype(np.float32)
    x = np.concatenate([features, features + noise])
    want = detector.score(x)
    got = {}
    for kernel in ("dense", "skl2onnx"):
        model = build_composite("f", "r", detector.n_features, detector.sets, detector.vote, kernel=kernel)
        got[kernel] = OnnxGraph(model.SerializeToString()).session.run(None, {"f": x})[0]
    assert rel_diff(want, got["dense"]) <= 1e-5
    assert rel_diff(want, got["skl2onnx"]) <= 1e-3
    assert rel_diff(want, got["dense"]) <= rel_diff(want, got["skl2onnx"])
    assert np.ptp(want) > 1.0  # the comparison covers a real range of scores


def test_detector_interface(nic):
    model = onnx.load_from_string(nic.method("nic").detector.onnx_model())
    assert [v.name for v in model.graph.input] == ["nic.features"]
    assert [v.name for v in model.graph.output] == ["nic.raw"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_bundle_round_trip(nic, digits, tmp_path):
    path = tmp_path / "nic.hardened"
    save_bundle(nic, path)
    loaded, manifest = load_bundle(path)
    x = digits.test.x
    a, b = nic.run(x), loaded.run(x)
    assert np.array_equal(a["logits"], b["logits"])
    assert rel_diff(a["nic.score"], b["nic.score"]) <= 1e-4  # the loaded detector runs in onnxruntime
    assert np.array_equal(a["nic.alarm"], b["nic.alarm"])
    assert manifest["methods"][0]["config"]["sites"] == nic.method("nic").sites
    export_onnx(loaded)  # parity against the golden outputs recorded at instrument time


def test_composition_with_ctt_lite(tiny_model, digits):
    hardened = instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05", "nic"], Options(key="nic-test"),
                          policy="any")
    result = export_onnx(hardened)
    graph = OnnxGraph(result.model.SerializeToString())
    assert graph.output_names == ["logits", "score", "alarm", "ctt-lite.score", "ctt-lite.alarm",
                                  "nic.score", "nic.alarm"]
    x = digits.test.x.numpy()
    got, ref = graph.run(x), hardened.run(x)
    assert np.array_equal(got["alarm"], ref["alarm"])
    assert rel_diff(ref["nic.score"], got["nic.score"]) <= 1e-4
    assert hardened.facts["metrics"]["calibration_fpr"] <= 0.02


def test_voting_sets_export_and_use_the_key(nic_voting, tiny_model, digits):
    method = nic_voting.method("nic")
    assert method.config["sets"] == 3 and method.config["vote"] == 2
    result = export_onnx(nic_voting)
    assert result.parity.alarm_mismatches["nic.alarm"] == 0
    assert "TopK" in {n.op_type for n in result.model.graph.node}

    head = method.head
    assert not torch.equal(head.scale_0_0, head.scale_1_0)  # each set draws its own transform
    other = instrument(tiny_model, digits, ["nic:detectors=3"], Options(key="another-key"))
    assert not torch.equal(head.scale_0_0, other.method("nic").head.scale_0_0)
    x = digits.test.x
    assert not np.allclose(nic_voting.run(x)["nic.score"], other.run(x)["nic.score"], atol=1e-3)


def test_same_key_same_transform(tiny_model, digits, nic):
    again = instrument(tiny_model, digits, ["nic"], Options(key="nic-test", fpr=0.05)).method("nic")
    first = nic.method("nic")
    for name, value in first.head.state_dict().items():
        assert torch.equal(value, again.head.state_dict()[name]), name


def test_bad_options_are_one_line_errors(tiny_model, digits):
    with pytest.raises(HardenError, match="invariants='values' is not one of value, provenance, both"):
        instrument(tiny_model, digits, ["nic:invariants=values"], Options())
    with pytest.raises(HardenError, match="detectors=.0. must be >= 1"):
        instrument(tiny_model, digits, ["nic:detectors=0"], Options())
    with pytest.raises(HardenError, match="two derived models"):
        instrument(tiny_model, digits, ["nic:layers=last:1,invariants=provenance,output_probe=false"], Options())


def test_provenance_svms_take_their_own_gamma_and_nu(nic):
    # The provenance invariants default to a narrower kernel than the value invariants (harden/methods/nic.py,
    # DEFAULT_PROVENANCE_GAMMA): with gamma 1/n an input pushed just across a decision boundary fell INSIDE the
    # support of the near one-hot benign softmaxes.
    from harden.methods.nic import DEFAULT_GAMMA, DEFAULT_NU, DEFAULT_PROVENANCE_GAMMA, DEFAULT_PROVENANCE_NU

    method = nic.method("nic")
    (spec,) = method.detector.sets
    n_value = len(method.sites)
    for part in spec.parts[:n_value]:
        assert part.estimator.nu == DEFAULT_NU
        assert part.estimator.gamma == pytest.approx(DEFAULT_GAMMA / (part.stop - part.start))
    for part in spec.parts[n_value:]:
        svm = part.estimator[-1]  # after the StandardScaler of the softmaxes
        assert svm.nu == DEFAULT_PROVENANCE_NU
        assert svm.gamma == pytest.approx(DEFAULT_PROVENANCE_GAMMA / (part.stop - part.start))
    assert DEFAULT_PROVENANCE_GAMMA != DEFAULT_GAMMA


def test_provenance_options_and_their_errors(tiny_model, digits):
    hardened = instrument(tiny_model, digits, ["nic:invariants=provenance,provenance_gamma=1.0,provenance_nu=0.2"],
                          Options(key="nic-test"))
    (spec,) = hardened.method("nic").detector.sets
    for part in spec.parts:
        assert part.estimator[-1].nu == 0.2
        assert part.estimator[-1].gamma == pytest.approx(1.0 / (part.stop - part.start))
    with pytest.raises(HardenError, match="provenance_gamma=.0. must be > 0"):
        instrument(tiny_model, digits, ["nic:provenance_gamma=0"], Options())
    with pytest.raises(HardenError, match="provenance_nu=.1.5. must be <= 1"):
        instrument(tiny_model, digits, ["nic:provenance_nu=1.5"], Options())


class SixChannelCNN(torch.nn.Module):
    """A first conv map of 6 channels, which onnxruntime keeps in plain NCHW (LeNet-5's relu1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3)
        self.fc = torch.nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_row_means_per_site_export_and_old_bundles(digits):
    # A conv map whose channel count is not a multiple of 8 takes its row means with a ReduceSum, any other with
    # an average pool (latency only: harden/methods/nic.py, NICHead.spatial_mean); both must export with parity,
    # and a bundle written before the choice was recorded (no "rows" in its config) keeps the average pool.
    from harden.methods.nic import NICHead

    torch.manual_seed(0)
    model = SixChannelCNN().eval()
    hardened = instrument(model, digits, ["nic"], Options(key="nic-test", fpr=0.05))
    method = hardened.method("nic")
    assert method.config["rows"][:2] == ["sum", "avgpool"]
    result = export_onnx(hardened)
    assert result.parity.alarm_mismatches["nic.alarm"] == 0
    assert result.parity.abs_diff["nic.score"] <= 1e-4
    reduce_sums = [n for n in result.model.graph.node if n.op_type == "ReduceSum"]
    pools = [n for n in result.model.graph.node if n.op_type == "AveragePool"]
    assert reduce_sums and len(pools) == 1

    old = NICHead({k: v for k, v in method.config.items() if k != "rows"})
    old.load_state_dict(method.head.state_dict())
    assert old.rows == ["avgpool"] * len(method.sites)
    activation = torch.rand(5, 6, 8, 8)
    torch.testing.assert_close(old.reduce(0, activation), method.head.reduce(0, activation), rtol=1e-6, atol=1e-7)


def test_nic_graph_agrees_at_every_onnxruntime_level_and_as_portable_float32(nic):
    from portability import check_every_runtime_setting

    check_every_runtime_setting(nic)


@pytest.mark.parametrize("value_first", [True, False])
def test_unscaled_svms_take_float32_exponents_and_match_sklearn(value_first):
    # The one-class SVMs without a scaler (the value invariants, on standardised features) compute their
    # exponents in float32, which the Exp rounds them to anyway; the scaled ones (provenance) keep float64.
    # One Exp and one dual product per group, the columns put back in SVM order: scikit-learn's score.
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    from harden.detectors.nic_onnx import Part, SetSpec
    from harden.methods.nic import NICDetector

    rng = np.random.default_rng(0)
    widths, classes, n = [64, 64, 128, 256], 10, 600
    value = [rng.standard_normal((n, w)).astype(np.float32) for w in widths]
    logits = rng.standard_normal((n, len(widths) + 1, classes)) * 3
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    features = np.concatenate(value + [soft.reshape(n, -1).astype(np.float32)], 1)
    parts, offset = [], 0
    for w in widths:
        parts.append(Part(OneClassSVM(nu=0.01, gamma=1.0 / w).fit(features[:, offset:offset + w]), offset, offset + w))
        offset += w
    provenance = []
    for i in range(len(widths)):
        a, b = offset + i * classes, offset + (i + 2) * classes
        provenance.append(Part(make_pipeline(StandardScaler(), OneClassSVM(nu=0.05, gamma=0.15)).fit(features[:, a:b]), a, b))
    parts = parts + provenance if value_first else provenance + parts
    invariants = np.stack([-p.estimator.decision_function(features[:, p.start:p.stop]) for p in parts], 1)
    final = make_pipeline(StandardScaler(), OneClassSVM(nu=0.1, gamma=1.0 / len(parts))).fit(invariants.astype(np.float32))
    detector = NICDetector("nic", features.shape[1], [SetSpec(parts, final)], None)
    model = onnx.load_from_string(detector.onnx_model())
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for j, part in enumerate(parts):   # float32 products for the SVMs without a scaler only
        scaled = hasattr(part.estimator, "steps")
        assert inits[f"set0/{j}/linear"] == (onnx.TensorProto.DOUBLE if scaled else onnx.TensorProto.FLOAT)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Exp") == 3 and ("Gather" in ops) is not value_first   # two groups of parts + the final SVM
    x = features[:200] + 0.3 * rng.standard_normal((200, features.shape[1])).astype(np.float32)
    got = OnnxGraph(detector.onnx_model()).session.run(None, {"nic.features": x})[0]
    assert rel_diff(detector.score(x), got) <= 1e-5


def test_head_joins_same_shape_sites_before_the_float64_mean():
    # consecutive sites of one shape (a ResNet stage) share one cast and one float64 mean of their row means:
    # the same numbers as site by site
    from harden.methods.nic import NICHead

    torch.manual_seed(0)
    shapes = [(16, 8, 8)] + [(16, 4, 4)] * 3 + [(32, 1, 1)] * 2 + [(6, 5, 5)]
    head = NICHead({"dims": [s[0] for s in shapes], "spatial": [True] * len(shapes), "sets": 1, "num_classes": 10,
                    "rows": ["avgpool"] * 6 + ["sum"], "value": True, "provenance": False})
    acts = [torch.relu(torch.randn(20, *s)) * 3 for s in shapes]
    joined = head.reduce_joined(acts)
    assert torch.equal(joined, torch.cat([head.reduce(i, a) for i, a in enumerate(acts)], dim=1))
