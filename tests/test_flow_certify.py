"""Certificates against flow fields: bound propagation from the flow box (+ TV), the two-layer SDP (brute force),
certified fine-tuning, and the CLI."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linprog
from typer.testing import CliRunner

from harden.certification.certify import certify_samples, check_certificates
from harden.certification.flow import FlowThreat
from harden.certification.sdp import TwoLayer, certify_sdp, check_sdp, sdp_margins, two_layer_parts
from harden.cli.app import app
from harden.errors import HardenError
from harden.graph.trace import trace
from harden.train.flow_objective import FlowObjective, finetune_flow, parse_objective, score

from conftest import TinyCNN, train_tiny


class TwoLayerDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


@pytest.fixture(scope="module")
def mlp(digits, one_thread):
    torch.manual_seed(0)
    return train_tiny(TwoLayerDigits(), digits.train.x, digits.train.y, epochs=15)


@pytest.mark.parametrize("bounds", ["ibp", "crown"])
@pytest.mark.parametrize("tv", [None, 4.0])
def test_flow_certificates_survive_the_sampling_check(tiny_model, digits, one_thread, bounds, tv):
    gm = trace(tiny_model)
    x, y = digits.test.x[:12], digits.test.y[:12]
    delta = {"ibp": 0.02, "crown": 0.05}[bounds]     # 8x8 digits: a pixel is an eighth of the image
    threat = FlowThreat(delta, tv, cells=2)
    certs = certify_samples(gm, [], x, y, threat, None, bounds=bounds)
    assert 0 < certs["fractions"]["robust"]
    result = check_certificates(gm, [], x, y, threat, None, n_points=24, seed=1, bounds=bounds)
    assert result.ok, result.to_dict()
    bigger = certify_samples(gm, [], x, y, FlowThreat(4 * delta, tv, cells=2), None, bounds=bounds)
    assert bigger["fractions"]["robust"] <= certs["fractions"]["robust"]


def test_the_tv_budget_never_loosens_the_certificate(mlp, digits):
    gm = trace(mlp)
    x, y = digits.test.x[:30], digits.test.y[:30]
    plain = certify_samples(gm, [], x, y, FlowThreat(0.6), None)
    budgeted = certify_samples(gm, [], x, y, FlowThreat(0.6, 2.0, cells=3), None)
    assert bool((budgeted["margin"] >= plain["margin"] - 1e-5).all())
    assert float((budgeted["margin"] - plain["margin"]).mean()) > 0


def _exact_max(w1, b1, v, lo, hi):
    """max over the box of v . relu(w1 x + b1): one LP per activation pattern."""
    best = -np.inf
    for pattern in itertools.product([0.0, 1.0], repeat=len(b1)):
        a = np.array(pattern)
        rows = [(-w1[i], b1[i]) if a[i] else (w1[i], -b1[i]) for i in range(len(b1))]
        res = linprog(-(v * a) @ w1, A_ub=np.array([r[0] for r in rows]), b_ub=np.array([r[1] for r in rows]),
                      bounds=list(zip(lo, hi)))
        if res.status == 0:
            best = max(best, -res.fun + (v * a) @ b1)
    return best


def test_the_sdp_bounds_the_true_worst_margin_of_tiny_two_layer_nets():
    rng = np.random.default_rng(0)
    for trial in range(6):
        d, m, k = 5, 4, 3
        w1, b1 = rng.normal(size=(m, d)), rng.normal(size=m) * 0.5
        w2, b2 = rng.normal(size=(k, m)), rng.normal(size=k)
        centre, radius = rng.uniform(size=d), rng.uniform(0, 0.4, size=d)
        radius[trial % d] = 0.0                                   # a pixel that cannot move
        net = TwoLayer(*(torch.tensor(a) for a in (w1, b1, w2, b2)))
        bound, _ = sdp_margins(net, torch.tensor(centre)[None], torch.tensor(radius)[None], torch.tensor([0]))
        true = min(b2[0] - b2[j] - _exact_max(w1, b1, w2[j] - w2[0], centre - radius, centre + radius)
                   for j in range(1, k))
        assert float(bound[0]) <= true + 1e-7
        assert float(bound[0]) > true - 5.0   # a bound, not a vacuous one


def test_sdp_certificates_on_flows_agree_with_sampling(mlp, digits):
    gm = trace(mlp)
    x, y = digits.test.x[:1], digits.test.y[:1]
    threat = FlowThreat(0.03)
    sdp = certify_sdp(gm, x, y, threat, None)
    assert bool(sdp["robust"][0])
    checked = check_sdp(gm, x, y, threat, None, sdp["robust"], n_points=64)
    assert checked["violations"] == 0 and checked["points"] == 64
    with pytest.raises(HardenError, match="two-layer"):
        two_layer_parts(trace(TinyCNN()), (1, 8, 8))


def test_flow_finetuning_raises_the_certified_fraction(mlp, digits):
    gm = trace(mlp)
    before = score(gm, digits.calibration.x, digits.calibration.y, 0.1)
    facts = finetune_flow(gm, digits, parse_objective("flow:delta=0.1,steps=150,check_every=50,kappa=0.7"))
    after = score(gm, digits.calibration.x, digits.calibration.y, 0.1)
    assert after[2] > before[2] + 0.1
    assert facts["kept_step"] in [r["step"] for r in facts["history"]]
    for bad in ("flow", "flow:delta=0", "flow:delta=0.3,kappa=2", "flow:delta=0.3,steps=1.5", "flow:rate=1", "tv:delta=1"):
        with pytest.raises(HardenError):
            parse_objective(bad)


runner = CliRunner()


def test_instrument_finetune_then_certify_flows_from_the_cli(mlp, tmp_path):
    state = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), state)
    out = tmp_path / "mlp.hardened"
    made = runner.invoke(app, ["instrument", str(state), "--arch", "test_flow_certify:TwoLayerDigits", "--data", "digits",
                               "--method", "ctt-lite", "--key", "k", "--finetune", "flow:delta=0.1,steps=60,check_every=30",
                               "-o", str(out), "--json"], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    manifest = json.loads(made.output)["manifest"]
    assert manifest["finetuned"] and manifest["finetune"]["objective"] == "flow"
    assert parse_objective(manifest["recipe"]["finetune"]).to_dict() == parse_objective(
        "flow:delta=0.1,steps=60,check_every=30").to_dict()        # the recipe says how to fine-tune again
    exported = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "mlp.onnx")], catch_exceptions=False)
    assert exported.exit_code == 0, exported.output     # the fine-tuned weights ship, parity-checked
    result = runner.invoke(app, ["certify", str(out), "--threat", "flow:delta=0.1,tv=3", "--threat", "linf",
                                 "--eps", "0.01", "--limit", "20", "--check", "8", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    flow = report["results"]["flow:delta=0.1,tv=3"]
    assert set(report["results"]) == {"0.01", "flow:delta=0.1,tv=3"}
    assert flow["hardened"]["robust"] >= flow["original"]["robust"]
    assert all(c["violations"] == 0 for c in report["check"].values())
    plot = tmp_path / "flow.png"
    drawn = runner.invoke(app, ["certify", str(out), "--threat", "flow:delta=0.05", "--threat", "flow:delta=0.1",
                                "--limit", "10", "--plot", str(plot)], catch_exceptions=False)
    assert drawn.exit_code == 0, drawn.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"     # the fractions against delta
    mixed = runner.invoke(app, ["certify", str(out), "--threat", "flow:delta=0.1", "--threat", "flow:delta=0.1,tv=3",
                                "--limit", "5", "--plot", str(tmp_path / "mixed.png")])
    assert mixed.exit_code != 0 and "one TV budget" in mixed.output and not (tmp_path / "mixed.png").exists()
    bad = runner.invoke(app, ["certify", str(out), "--threat", "flow:tv=3"])
    assert bad.exit_code != 0 and "delta" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["instrument", str(state), "--arch", "test_flow_certify:TwoLayerDigits", "--data", "digits",
                              "--method", "ctt-strict", "--finetune", "flow:delta=0.1", "-o", str(tmp_path / "x.hardened")])
    assert bad.exit_code != 0 and "--finetune" in bad.output and not (tmp_path / "x.hardened").exists()
