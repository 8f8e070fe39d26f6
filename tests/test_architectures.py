"""The torchvision and timm families (tests/zoo.py, tiny widths) through every stage, as state_dict + --arch and
as a torch.export program (.pt2).

Per family and form: ``harden layers`` (every element-wise activation a site), a bundle round trip with the
logits bit-identical, ``certify`` with interval and linear-relaxation bounds checked by sampling; the same key
gives the same traps in both forms.  Every method at once (ctt-strict on a tiny step budget), export parity in
onnxruntime and ``evaluate`` run on the composite of every family (one export per form: an export costs seconds,
so each family alone is measured in bench/architectures.py --part matrix instead).  Models train two epochs: enough
for realistic activations and batch-norm statistics, not for accuracy, which no assertion here reads.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
from typer.testing import CliRunner

import harden
from harden.api import ctt_traps
from harden.certification.certify import check_certificates, certify_samples
from harden.cli.app import app
from harden.errors import HardenError
from harden.graph.ops import SITE_OPS, canonical_op
from harden.graph.trace import site_keys, sites, trace
from harden.io.data import load_data
from harden.methods.base import MethodSpec, Options

from conftest import train_tiny
from tests import zoo

FAMILIES = list(zoo.FAMILIES)
FORMS = ("state_dict", "pt2")
LIMIT = 360          # digits: 216 train, 72 calibration, 72 test
KEY = "zoo-key"
runner = CliRunner()

# Activations each family must expose as sites (beyond any ReLU): the point of the matrix.
EXPECTED_SITE_OPS = {
    "mobilenet_v2": {"relu6"}, "mobilenet_v3": {"hardswish", "hardsigmoid", "relu"},
    "efficientnet": {"silu", "sigmoid"}, "regnet": {"relu", "sigmoid"}, "convnext": {"gelu"}, "vit": {"gelu"},
    "timm_vit": {"gelu"}, "activations": {"leaky_relu", "elu", "mish", "gelu"},
}


@pytest.fixture(scope="module")
def data():
    return load_data("digits", seed=0, limit=LIMIT)


EPOCHS = 2


@functools.lru_cache(maxsize=None)
def _trained(family: str) -> nn.Module:
    d = load_data("digits", seed=0, limit=LIMIT)
    model = zoo.composite_tiny() if family == "composite" else zoo.build(family)
    return train_tiny(model, d.train.x, d.train.y, epochs=EPOCHS, lr=1e-2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """family -> form -> (path, --arch or None)."""
    folder = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def get(family: str, form: str):
        if (family, form) not in cache:
            model = _trained(family)
            if form == "pt2":
                path = folder / f"{family}.pt2"
                example = torch.rand(4, 1, 8, 8)
                program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
                torch.export.save(program, str(path))
                cache[(family, form)] = (path, None)
            else:
                path = folder / f"{family}.pt"
                torch.save(model.state_dict(), path)
                cache[(family, form)] = (path, f"tests.zoo:{family}_tiny")
        return cache[(family, form)]

    return get


_LOADED: dict = {}


def _load(files, family: str, form: str):
    """The model as a user's file gives it, loaded once per test module."""
    if (family, form) not in _LOADED:
        path, arch = files(family, form)
        _LOADED[(family, form)] = harden.load_model(path, arch=arch)
    return _LOADED[(family, form)]


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


_LITE: dict = {}


def _ctt_lite(files, data, family: str, form: str):
    if (family, form) not in _LITE:
        model = _load(files, family, form)
        _LITE[(family, form)] = harden.instrument(model, data, [MethodSpec.of("ctt-lite", mask_ratio=0.2)],
                                                  Options(key=KEY, fpr=0.1, fpr_confidence=0))
    return _LITE[(family, form)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_layers_bundle_and_certify(family, form, files, data, tmp_path, one_thread):
    path, arch = files(family, form)
    args = ["layers", path, "--data", "digits", "--json"] + (["--arch", arch] if arch else [])
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    gm = trace(_load(files, family, form))
    expected = [n.name for n in sites(gm)]
    assert shown["sites"] == expected and expected
    ops = {canonical_op(gm, n) for n in sites(gm)}
    assert ops <= SITE_OPS and EXPECTED_SITE_OPS.get(family, {"relu"}) <= ops, ops
    if family == "regnet":   # the user's module names, though the graph renames block1-0 to block1_0
        assert any("block1-0" in row["module"] for row in shown["nodes"])
    # what each method takes by default: the trap methods and NIC the deepest 8, SafetyNet every site
    assert shown["default_sites"]["ctt-strict"] == expected[-8:] == shown["default_sites"]["nic"]
    assert shown["default_sites"]["safetynet"] == expected

    hardened = _ctt_lite(files, data, family, form)
    bundle = tmp_path / "model.hardened"
    harden.save_bundle(hardened, bundle)
    loaded, _ = harden.load_bundle(bundle)
    original = _load(files, family, form)   # the model as the user gave it (a .pt2 runs its own ops)
    with torch.no_grad():
        assert torch.equal(loaded.classifier(data.test.x), original(data.test.x))
    assert np.array_equal(loaded.run(data.test.x[:16])["alarm"], hardened.run(data.test.x[:16])["alarm"])

    traps = ctt_traps(hardened)
    x, y = data.test.x[:2], data.test.y[:2]
    for bounds in ("ibp", "crown"):
        cert = certify_samples(hardened.classifier, traps, x, y, 0.01, data.input_range, bounds=bounds)
        assert bool((cert["detect_or_robust"] >= cert["robust"]).all())
        check = check_certificates(hardened.classifier, traps, x, y, 0.01, data.input_range, 12, 0, bounds=bounds)
        assert check.violations == 0, (bounds, check)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_key_gives_the_same_traps_in_either_form(family, files, data, one_thread):
    by_form = {}
    for form in FORMS:
        hardened = _ctt_lite(files, data, family, form)
        method = hardened.methods[0]
        by_form[form] = ({k: method.head.trap(i) for i, k in enumerate(method.config["site_keys"])},
                         hardened.run(data.test.x)["ctt-lite.alarm"])
    (fx_traps, fx_alarm), (pt2_traps, pt2_alarm) = by_form["state_dict"], by_form["pt2"]
    assert fx_traps.keys() == pt2_traps.keys()
    for key in fx_traps:
        assert torch.equal(fx_traps[key][0], pt2_traps[key][0]), key                    # the same neurons
        assert torch.allclose(fx_traps[key][1], pt2_traps[key][1], rtol=1e-5, atol=1e-6), key   # natural maxima
    assert np.array_equal(fx_alarm, pt2_alarm)


METHODS = ["ctt-lite", "ctt-strict", "safetynet", "nic", "mismatch"]


def _specs(second_model, nic_layers: str) -> list[MethodSpec]:
    second = {"second_model": str(second_model), "second_arch": "conftest:TinyCNN"}
    detector = {"attacks": ["fgsm:eps=0.1"], "svm_c": 1.0, "max_train": 48}
    return [MethodSpec.of("ctt-lite", mask_ratio=0.2),
            MethodSpec.of("ctt-strict", mask_ratio=0.2, eps=0.01, steps=2, check_every=1),
            MethodSpec.of("safetynet", **detector),
            MethodSpec.of("nic", layers=nic_layers),
            MethodSpec.of("mismatch", **second, **detector)]


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, data):
    from conftest import TinyCNN

    torch.manual_seed(1)
    model = train_tiny(TinyCNN(), data.train.x, data.train.y, epochs=15)
    path = tmp_path_factory.mktemp("second") / "second.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("form", FORMS)
def test_every_method_on_every_family_exports_with_parity_and_evaluates(form, files, data, second_model, tmp_path,
                                                                        one_thread):
    path, arch = files("composite", form)
    model = _load(files, "composite", form)
    gm = trace(model)
    keys = site_keys(gm, sites(gm))
    last = {}   # NIC (a probe per site) on each family's last site; SafetyNet on every site, CTT the deepest 8
    for node in sites(gm):
        last[keys[node.name].split("/")[0].split(".")[0]] = node.name
    assert len(last) >= len(FAMILIES)
    hardened = harden.instrument(model, data, _specs(second_model, ",".join(last.values())),
                                 Options(key=KEY, fpr=0.1, fpr_confidence=0))
    assert sorted(m.name for m in hardened.methods) == sorted(METHODS)
    assert {canonical_op(gm, n) for n in sites(gm) if n.name in hardened.method("safetynet").sites} >= \
        set().union(*EXPECTED_SITE_OPS.values())
    onnx_path = tmp_path / "model.onnx"
    result = harden.export_onnx(hardened, onnx_path)
    assert result.parity.worst_ratio() <= 1.0
    manifest = harden.save_bundle(hardened, tmp_path / "model.hardened")
    evaluated = harden.evaluate(hardened, manifest, ["fgsm:eps=0.2"], onnx_path=onnx_path, limit=16)
    row = evaluated.rows[0]
    assert row.n == 16 and row.accuracy <= evaluated.clean_accuracy
    assert row.detection_rate is None or 0.0 <= row.detection_rate <= 1.0


# the families whose logits come from one nn.Linear, which abstain needs (its score is one more row on that layer)
NO_LOGITS_LINEAR = {"squeezenet": "a convolution and a global pool give its logits"}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_abstain_detector_on_every_family_fine_tunes_exports_and_certifies(family, form, files, data,
                                                                              one_thread):
    """abstain fine-tunes the classifier itself, so it runs on its own (not in the composite, whose logits are a
    sum of branches): a tiny budget, export parity, and its certificate with the sampling check."""
    from harden.api import certify

    model = _load(files, family, form)
    spec = MethodSpec.of("abstain", eps=0.01, steps=2, check_every=2)
    options = Options(key=KEY, fpr=0.1, fpr_confidence=0)
    if family in NO_LOGITS_LINEAR:
        with pytest.raises(HardenError, match="nn.Linear") as caught:
            harden.instrument(model, data, [spec], options)
        assert len(str(caught.value).splitlines()) == 1
        return
    hardened = harden.instrument(model, data, [spec], options)
    assert harden.export_onnx(hardened).parity.worst_ratio() <= 1.0
    for bounds in ("ibp", "crown") if form == "state_dict" else ("ibp",):
        report = certify(hardened, dict(hardened.facts), [0.01], limit=2, check=12, bounds=bounds)
        for key, result in report["results"].items():
            assert result["hardened"]["detect_or_robust"] >= result["hardened"]["robust"]
            assert report["check"][key]["violations"] == 0, (bounds, report["check"][key])


# ----------------------------------------------------------------------------- tracing edge cases


class GreyOrColour(nn.Module):
    """Converts colour input to grey when given three channels: control flow on a shape, which torch.fx cannot
    trace and torch.export can (the shape is fixed by the example)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_untraceable_model_names_the_node_and_works_as_pt2(tmp_path, data, one_thread):
    model = GreyOrColour().eval()
    with pytest.raises(HardenError) as caught:
        trace(model)
    message = str(caught.value)
    assert "torch.fx cannot trace the model" in message and "torch.export" in message and ".pt2" in message
    assert len(message.splitlines()) == 1
    path = tmp_path / "grey.pt2"
    program = torch.export.export(model, (data.train.x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    result = _cli("layers", path, "--data", "digits", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sites"]
    hardened = harden.instrument(harden.load_model(path), data, ["ctt-lite"], Options(key=KEY, fpr=0.1,
                                                                                    fpr_confidence=0))
    assert harden.export_onnx(hardened).parity.worst_ratio() <= 1.0


def relative_bias(table: torch.Tensor, size: int) -> torch.Tensor:
    """Like swin's relative-position helper: a library function torch.fx keeps as one call."""
    return table[:size].reshape(1, -1)


torch.fx.wrap("relative_bias")


class WithWrappedHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.table = nn.Parameter(torch.zeros(16, 4))

    def forward(self, x):
        return torch.relu(self.fc(x.flatten(1))) + relative_bias(self.table, 10)[:, :10]


def test_what_a_bundle_cannot_store_is_refused_when_traced(tmp_path):
    path = tmp_path / "helper.pt"
    torch.save(WithWrappedHelper().state_dict(), path)
    result = _cli("layers", path, "--arch", "test_architectures:WithWrappedHelper", "--input-shape", "1,8,8")
    assert result.exit_code != 0
    line = result.output.strip()
    assert "relative_bias" in line and "torch.export" in line and len(line.splitlines()) == 1


def test_stochastic_depth_and_assertions_are_gone_and_optional_arguments_bound():
    for family in ("efficientnet", "convnext", "vit", "timm_vit"):
        gm = trace(zoo.build(family))
        targets = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes}
        assert not targets & {"stochastic_depth", "_assert", "eq", "_assert_is_none"}, (family, targets)
        assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 1


def test_site_keys_name_module_path_op_and_position():
    gm = trace(zoo.build("resnet18"))
    keys = site_keys(gm, sites(gm))
    assert keys["layer1_0_relu"] == "layer1.0.relu/relu/0"
    assert keys["layer1_0_relu_1"] == "layer1.0.relu/relu/1"   # the block's one ReLU module, called twice


def test_every_in_place_op_a_program_may_hold_has_its_out_of_place_twin_allowed():
    from harden.core.aten_ops import ATEN_OPS, INPLACE_ATEN_OPS

    for name in INPLACE_ATEN_OPS:
        _, op, overload = name.split(".")
        mutating = getattr(getattr(torch.ops.aten, op), overload)
        assert mutating._schema.is_mutable, name
        assert f"aten.{op[:-1]}.{overload}" in ATEN_OPS, name
