"""The abstain-class detector (--method abstain): the loss is the certificate, it trains, what harden certify proves
about it holds on dense samples of the box, the ONNX graph computes the same alarm, and the CLI runs it end to end."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from harden.bounds.abstain import abstain_hinge, certificate_of
from harden.certification.certify import AbstainAlarm, certify_samples, check_certificates
from harden.graph.trace import trace
from harden.train.abstain import AbstainBounds, AbstainConfig, AbstainHead, finetune_abstain
from tests.box_toys import trained_two_input_toy, two_input_data


def three_classes() -> nn.Module:
    """h = relu(x) (W1 = I), logits (h1, h2, 0): every bound can be read off by hand."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        net[2].bias.zero_()
    return net.eval()


def head_of(w, b) -> AbstainHead:
    head = AbstainHead(2)
    with torch.no_grad():
        head.abstain.weight.copy_(torch.tensor([w], dtype=torch.float32))
        head.abstain.bias.fill_(b)
    return head.eval()


X = torch.tensor([[0.6, 0.4]])
Y = torch.tensor([0])


@pytest.mark.parametrize("eps,w,b,threshold,holds,always", [
    (0.05, (0.0, 0.0), -5.0, 0.0, True, False),    # robust: h1 - h2 >= 0.1 on the box, the abstain score is moot
    (0.15, (0.0, 0.0), -5.0, 0.0, False, False),   # h2 may beat h1 (0.45 against 0.55) and nothing alarms
    (0.15, (0.0, 1.0), 0.05, 0.0, True, False),    # z_abs = h2 + 0.05 beats class 1 everywhere; class 2 < h1
    (0.15, (0.0, 1.0), -0.05, 0.0, False, False),  # ... 0.05 below class 1 everywhere: never alarms
    (0.15, (0.0, 1.0), -0.05, -0.1, True, False),  # the calibrated offset -t = +0.1 lifts it above class 1
    (0.15, (0.0, 0.0), 2.0, 0.0, True, True),      # z_abs = 2 beats every class on the whole box: always alarms
    (0.15, (1.0, 0.0), 0.0, 0.0, False, False),    # z_abs = h1 ties with class 0 and loses nothing to class 1
])
def test_the_loss_is_zero_exactly_when_the_certificate_holds(eps, w, b, threshold, holds, always):
    gm = trace(three_classes())
    head = head_of(w, b)
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0].all_input_nodes[0].name
    verdict = certify_samples(gm, [], X, Y, eps, (0.0, 1.0), abstain=[AbstainAlarm(node, head, threshold)])
    assert verdict["detect_or_robust"].tolist() == [holds]
    assert verdict["always_alarm"].tolist() == [always]
    _, _, lower = AbstainBounds(gm, head, (0.0, 1.0))(X, Y, eps, offset=-threshold)
    assert (abstain_hinge(lower, Y) == 0).tolist() == [holds]
    assert certificate_of(lower, Y).always.tolist() == [always]
    # the same rows by crown agree here (one ReLU layer, all stable on these boxes)
    crown = certify_samples(gm, [], X, Y, eps, (0.0, 1.0), bounds="crown",
                            abstain=[AbstainAlarm(node, head, threshold)])
    assert crown["detect_or_robust"].tolist() == [holds]


def test_the_loss_is_differentiable_and_falls_on_a_short_fine_tune(tiny_model, digits, one_thread):
    gm = trace(copy.deepcopy(tiny_model))
    head = AbstainHead(32)
    x, y = digits.train.x[:200], digits.train.y[:200]
    eps = 0.01

    def loss(model, h):
        logits, feats, lower = AbstainBounds(model, h, digits.input_range)(x, y, eps)
        natural = nn.functional.cross_entropy(torch.cat([logits, h.score(feats).unsqueeze(1)], 1), y)
        return natural + abstain_hinge(lower, y).mean(), abstain_hinge(lower, y).mean()

    params = list(gm.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    total, cert = loss(gm, head)
    grads = torch.autograd.grad(cert, params, allow_unused=True)
    assert cert > 0 and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert grads[-2] is not None and grads[-2].abs().sum() > 0   # the abstain row learns from the certificate
    before = float(total.detach())
    for p in params:
        p.requires_grad_(False)
    cfg = AbstainConfig(eps=eps, steps=60, check_every=20, eps_warmup=0.0, max_accuracy_drop=1.0, loss="hinge")
    finetune_abstain(gm, head, (digits.train.x, digits.train.y), (digits.calibration.x, digits.calibration.y),
                     digits.input_range, cfg)
    with torch.no_grad():
        assert float(loss(gm, head)[0]) < before


@pytest.mark.parametrize("loss", ["hinge", "ce"])
def test_certify_agrees_with_a_dense_grid_of_the_box_on_a_trained_toy(loss, one_thread):
    """Trained jointly with its abstain score, certified by harden certify (ibp and crown): no point of a dense grid
    over any certified box is misclassified without the alarm, and --check's sampling finds nothing either."""
    model, x, y = trained_two_input_toy()
    gm = trace(model.eval())
    head = AbstainHead(16)
    eps = 0.05
    cfg = AbstainConfig(eps=eps, steps=300, check_every=50, batch_size=100, max_accuracy_drop=1.0, loss=loss,
                        robust_weight=0.0 if loss == "ce" else 1.0, fpr=0.1, fpr_confidence=0.0)
    finetune_abstain(gm, head, (x[:400], y[:400]), (x[400:], y[400:]), (0.0, 1.0), cfg)
    with torch.no_grad():
        raw = head(gm.relu2(gm.fc2(gm.relu1(gm.fc1(gm.flatten(x[400:]))))), gm(x[400:]))
    threshold = float(torch.quantile(raw, 0.9))
    detector = AbstainAlarm("relu2", head, threshold)
    xt, yt = two_input_data(80, 1)
    steps = torch.linspace(-1.0, 1.0, 41)
    offsets = torch.tensor(list(itertools.product(steps, steps))).reshape(-1, 1, 1, 2) * eps
    checked = detected = 0
    for bounds in ("ibp", "crown"):
        verdict = certify_samples(gm, [], xt, yt, eps, (0.0, 1.0), bounds=bounds, abstain=[detector])
        detected += int((verdict["detect_or_robust"] & ~verdict["robust"]).sum())
        for i in torch.nonzero(verdict["detect_or_robust"]).flatten().tolist():
            points = (xt[i] + offsets).clamp(0.0, 1.0)
            with torch.no_grad():
                logits = gm(points)
                h = gm.relu2(gm.fc2(gm.relu1(gm.fc1(gm.flatten(points)))))
            alarm = detector.alarm(h, logits)
            wrong = logits.argmax(1) != yt[i]
            assert not (wrong & ~alarm).any(), f"{bounds}: sample {i} certified but a quiet grid point is misclassified"
            checked += 1
        check = check_certificates(gm, [], xt, yt, eps, (0.0, 1.0), 64, bounds=bounds, abstain=[detector])
        assert check.ok, check.to_dict()
    assert checked > 20   # the certificate is not vacuous on this toy
    if loss == "ce":      # trained for detection alone: the abstain alarm certifies boxes the label margin does not
        assert detected > 0


@pytest.fixture(scope="module")
def abstain_hardened(tiny_model, digits):
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import MethodSpec, Options

    torch.set_num_threads(1)
    return instrument(tiny_model, digits, [MethodSpec.of("abstain", eps=0.01, steps=40, check_every=20)],
                      Options(key="test-key"))


def test_export_parity_and_the_alarm_is_the_abstain_rule(abstain_hardened, digits, tmp_path):
    from harden.bundle.archive import load_bundle, save_bundle
    from harden.export import export_onnx
    from harden.export.runtime import OnnxGraph

    bundle = tmp_path / "abstain.hardened"
    save_bundle(abstain_hardened, bundle)
    loaded, _ = load_bundle(bundle)
    export_onnx(loaded, tmp_path / "abstain.onnx", source=bundle)
    graph = OnnxGraph(tmp_path / "abstain.onnx")
    assert graph.output_names == ["logits", "score", "alarm", "abstain.score", "abstain.alarm"]
    x = digits.test.x.numpy()
    got, ref = graph.run(x), abstain_hardened.run(x)
    assert got["logits"].shape == (len(x), 10)
    assert np.abs(got["logits"] - ref["logits"]).max() <= 1e-4
    assert np.abs(got["score"] - ref["score"]).max() <= 1e-4
    assert np.array_equal(got["alarm"], ref["alarm"])
    # the alarm is "z_abs - t beats every class logit"
    method = abstain_hardened.method("abstain")
    t = abstain_hardened.facts["thresholds"]["abstain"]
    with torch.no_grad():
        from harden.graph.analyse import feature_extractor

        logits, h = feature_extractor(abstain_hardened.classifier, [method.head_inputs[0]])(digits.test.x)
        rule = (method.head.score(h) - t > logits.amax(1)).numpy()
    assert np.array_equal(rule, ref["alarm"])


def test_certify_reports_the_abstain_certificate_and_the_check_agrees(abstain_hardened):
    from harden.api import certify

    report = certify(abstain_hardened, {**abstain_hardened.facts, "policy": abstain_hardened.facts["policy"]},
                     [0.01, 0.03], limit=40, check=8, bounds="crown")
    assert report["abstain"] and report["abstain"][0]["node"] == abstain_hardened.method("abstain").head_inputs[0]
    for key, result in report["results"].items():
        assert result["hardened"]["detect_or_robust"] >= result["hardened"]["robust"]
        assert report["check"][key]["violations"] == 0


def test_cli_instrument_export_certify(tiny_model, tmp_path):
    from harden.cli.app import app

    runner = CliRunner()
    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    out = tmp_path / "tiny.hardened"

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    result = invoke("instrument", state, "--arch", "conftest:TinyCNN", "--data", "digits", "--method",
                    "abstain:eps=0.01,steps=30,check_every=15,loss=ce", "--key", "k", "-o", out)
    assert result.exit_code == 0, result.output
    assert "abstain fine-tuning" in result.output and "certified at eps" in result.output   # its own history table
    result = invoke("export", out, "-o", tmp_path / "tiny.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"] == ["logits", "score", "alarm", "abstain.score", "abstain.alarm"]
    result = invoke("certify", out, "--eps", "0.01", "--limit", "20", "--check", "4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["check"]["0.01"]["violations"] == 0
    assert doc["results"]["0.01"]["hardened"]["detect_or_robust"] >= doc["results"]["0.01"]["hardened"]["robust"]
    result = invoke("methods", "abstain")
    assert result.exit_code == 0 and "kappa" in result.output


def test_the_adaptive_surrogate_is_the_shipped_score(abstain_hardened, digits):
    from harden.evaluation.adaptive import _Target
    from harden.methods.surrogates import KEY_UNKNOWN, Knowledge, surrogates_for

    x = digits.test.x[:100]
    shipped = abstain_hardened.raw_scores(abstain_hardened.torch_outputs(x))[:, 0]
    for knowledge in (None, Knowledge(attacker=KEY_UNKNOWN, reference=digits.train.x)):
        (surrogate,) = surrogates_for(abstain_hardened, knowledge).values()
        target = _Target(abstain_hardened.classifier, {"m": surrogate})
        target.prepare(x)
        exact = target(x, smooth=False)[1]["m"].detach().double().numpy()
        assert np.abs(exact - shipped).max() <= 1e-4 * max(1.0, np.abs(shipped).max())
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(xg, smooth=True)[1]["m"].sum(), xg)
    assert (grad.flatten(1).abs().sum(1) > 0).all()
