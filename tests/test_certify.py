"""Certificates: placement of CTT traps, robust / detect-or-robust per sample, and the check through the real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harden.bounds import BOUND_RULES, Interval
from harden.certification.certify import Trap, certify_samples, check_certificates, placement
from harden.errors import HardenError
from harden.graph.trace import trace


def two_layer(w2=((1.0, 0.0), (0.0, 1.0))) -> nn.Module:
    """h = relu(x) (W1 = I, b1 = 0), logits = W2 h: everything can be checked by hand."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor(w2))
        net[2].bias.zero_()
    return net.eval()


def relu_node(gm) -> str:
    return next(n.name for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU))


X = torch.tensor([[0.6, 0.4]])
Y = torch.tensor([0])


def test_robust_by_hand():
    # logits = h, margin h1 - h2 over h1 in [0.55, 0.65], h2 in [0.35, 0.45]: at least 0.1 > 0.
    gm = trace(two_layer())
    r = certify_samples(gm, [], X, Y, 0.05, (0.0, 1.0))
    assert r["robust"].tolist() == [True]
    assert torch.allclose(r["margin"], torch.tensor([0.1]), atol=1e-6)
    # eps 0.15: h1 in [0.45, 0.75], h2 in [0.25, 0.55]: margin down to -0.1.
    r = certify_samples(gm, [], X, Y, 0.15, (0.0, 1.0))
    assert r["robust"].tolist() == [False]
    assert torch.allclose(r["margin"], torch.tensor([-0.1]), atol=1e-6)
    # without traps, detect-or-robust is robust and nothing always alarms
    assert torch.equal(r["robust"], r["detect_or_robust"]) and not r["always_alarm"].any()
    assert r["fractions"] == {"robust": 0.0, "detect_or_robust": 0.0, "always_alarm": 0.0}


def test_detect_or_robust_by_hand():
    gm = trace(two_layer())
    site = relu_node(gm)
    cases = {
        # T: (robust, detect_or_robust, always_alarm)
        0.4: (False, True, False),   # inputs that keep h2 <= 0.4 have margin >= 0.45 - 0.4 = 0.05
        0.2: (False, True, True),    # h2 >= 0.25 > 0.2 on the whole box: every input alarms
        0.5: (False, False, False),  # h2 may reach 0.5 quietly: margin down to 0.45 - 0.5 < 0
    }
    for t, expected in cases.items():
        trap = Trap(site, torch.tensor([1]), torch.tensor([t]))
        r = certify_samples(gm, [trap], X, Y, 0.15, (0.0, 1.0))
        assert (r["robust"].item(), r["detect_or_robust"].item(), r["always_alarm"].item()) == expected, t


def test_margin_folding_beats_interval_subtraction():
    # logits_0 - logits_1 = 0.5 h2 > 0 whenever h2 > 0; subtracting logit intervals forgets that h1 cancels.
    w2 = ((1.0, 1.0), (1.0, 0.5))
    x = torch.tensor([[0.8, 0.2]])
    folded = certify_samples(trace(two_layer(w2)), [], x, Y, 0.1, (0.0, 1.0))
    assert folded["margin_method"].startswith("folded")
    assert folded["robust"].tolist() == [True]
    assert torch.allclose(folded["margin"], torch.tensor([0.05]), atol=1e-6)

    class NotLinearAtTheEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_layer(w2)

        def forward(self, x):
            return self.net(x) * 1.0

    naive = certify_samples(trace(NotLinearAtTheEnd()), [], x, Y, 0.1, (0.0, 1.0))
    assert naive["margin_method"] == "interval subtraction"
    assert naive["robust"].tolist() == [False]  # sound but looser: (0.7 + 0.1) - (0.9 + 0.15) < 0


def test_folding_works_for_every_spelling_of_the_last_linear():
    w = torch.tensor([[1.0, 1.0], [1.0, 0.5]])

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(w.clone())

        def forward(self, x):
            return F.linear(torch.relu(x), self.w)

    x = torch.tensor([[0.8, 0.2]])
    for gm in (trace(Functional()), trace(torch.export.export(Functional(), (x,)).module())):
        r = certify_samples(gm, [], x, Y, 0.1, (0.0, 1.0))
        assert r["margin_method"].startswith("folded") and r["robust"].tolist() == [True]


def test_placement_by_hand():
    gm = trace(two_layer())
    site = relu_node(gm)
    rows = placement(gm, [Trap(site, torch.tensor([1]), torch.tensor([0.4]))], X, 0.15, (0.0, 1.0))
    assert rows == [{"site": site, "neurons": 1, "natural_below": 1.0, "upper_reaches": 1.0, "lower_reaches": 0.0,
                     "lower_exceeds": 0.0}]
    rows = placement(gm, [Trap(site, torch.tensor([0, 1]), torch.tensor([0.3, 0.3]))], X, 0.15, (0.0, 1.0))
    # natural (0.6, 0.4) <= 0.3: none; hi (0.75, 0.55) >= 0.3: both; lo (0.45, 0.25) >= 0.3: the first
    assert rows[0]["natural_below"] == 0.0 and rows[0]["upper_reaches"] == 1.0 and rows[0]["lower_reaches"] == 0.5
    # lo == T counts as "reaches" but not "exceeds": the alarm is activation > T
    # (a dead-at-the-bottom neuron: x2 = 0.1 - 0.15 < 0 gives lo = relu(...) = 0 = T)
    rows = placement(gm, [Trap(site, torch.tensor([1]), torch.tensor([0.0]))], torch.tensor([[0.6, 0.1]]), 0.15,
                     (-1.0, 1.0))
    assert rows[0]["lower_reaches"] == 1.0 and rows[0]["lower_exceeds"] == 0.0


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu1(self.conv(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def small_cnn_setup(n=12):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    gm = trace(model)
    x = torch.rand(n, 1, 8, 8)
    y = gm(x).argmax(1)
    traps = [Trap("relu1", torch.tensor([3, 40, 77, 100]), torch.tensor([0.05, 0.1, 0.0, 0.2])),
             Trap("relu", torch.tensor([2, 9]), torch.tensor([0.01, 0.3]))]
    return gm, x, y, traps


def test_certificates_and_check_agree_on_a_small_cnn():
    gm, x, y, traps = small_cnn_setup()
    for eps in (0.0, 0.002, 0.05):
        certs = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), batch_size=5)
        assert bool((certs["robust"] <= certs["detect_or_robust"]).all())  # robust implies detect-or-robust
        assert bool((certs["always_alarm"] <= certs["detect_or_robust"]).all())
        result = check_certificates(gm, traps, x, y, eps, (0.0, 1.0), n_points=16, seed=3)
        assert result.ok, [str(v) for v in result.details]
        assert result.points == 16 * len(x) and result.boxes == len(x)
    point = certify_samples(gm, [], x, y, 0.0, (0.0, 1.0))
    assert point["robust"].all()  # eps = 0: the predicted label is certified


def test_batch_size_does_not_change_certificates():
    gm, x, y, traps = small_cnn_setup()
    a = certify_samples(gm, traps, x, y, 0.02, (0.0, 1.0), batch_size=256)
    b = certify_samples(gm, traps, x, y, 0.02, (0.0, 1.0), batch_size=5)
    for key in ("robust", "detect_or_robust", "always_alarm"):
        assert torch.equal(a[key], b[key])


def test_check_finds_a_planted_unsound_rule(monkeypatch):
    gm, x, y, traps = small_cnn_setup()

    def shrunk_relu(call):
        """relu, wrongly: keeps only the lower half of the true interval."""
        iv = call.args[0]
        lo, hi = torch.relu(iv.lo), torch.relu(iv.hi)
        return Interval(lo, lo + 0.5 * (hi - lo))

    monkeypatch.setitem(BOUND_RULES._entries, "relu", shrunk_relu)
    result = check_certificates(gm, traps, x, y, 0.05, (0.0, 1.0), n_points=8, seed=0)
    assert not result.ok
    kinds = {v.kind for v in result.details}
    assert "bound" in kinds
    nodes = {v.node for v in result.details if v.kind == "bound"}
    assert nodes & {"relu1", "relu"}
    first = result.details[0]
    assert 0 <= first.sample < len(x) and f"sample {first.sample}" in str(first)
    assert result.to_dict()["violations"] == result.violations > 0


def test_check_finds_a_planted_unsound_certificate(monkeypatch):
    """A linear rule that drops the radius claims robustness it does not have; the check must object."""
    gm, x, y, _ = small_cnn_setup(24)

    def centre_only(call):
        """linear, wrongly: the centre alone."""
        from harden.bounds.linear import linear_parts

        iv, w, b = linear_parts(call)
        c = F.linear(iv.centre, w, b)
        return Interval(c, c)

    monkeypatch.setitem(BOUND_RULES._entries, "linear", centre_only)
    result = check_certificates(gm, [], x, y, 0.3, (0.0, 1.0), n_points=32, seed=0)
    assert not result.ok
    assert result.counts.get("bound", 0) > 0 and result.counts.get("robust", 0) > 0
    assert {"bound", "robust"} <= {v.kind for v in result.details}


def test_trap_validation():
    gm, x, y, _ = small_cnn_setup()
    with pytest.raises(HardenError, match="not in the graph"):
        certify_samples(gm, [Trap("nope", [0], [0.0])], x, y, 0.01, (0.0, 1.0))
    with pytest.raises(HardenError, match="indices"):
        Trap("relu1", [0, 1], [0.0])
    with pytest.raises(HardenError, match="out of range"):
        certify_samples(gm, [Trap("relu", [999], [0.0])], x, y, 0.01, (0.0, 1.0))
    with pytest.raises(HardenError, match="eps"):
        certify_samples(gm, [], x, y, -0.1, (0.0, 1.0))


def test_per_sample_eps():
    gm = trace(two_layer())
    x = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    r = certify_samples(gm, [], x, torch.tensor([0, 0]), torch.tensor([0.05, 0.15]), (0.0, 1.0))
    assert r["robust"].tolist() == [True, False]


def test_certify_on_a_trained_model(digits):
    """A small MLP trained for a moment on the 8x8 digits: real margins, traps on a hidden ReLU, the check holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(digits.train.x[:512]), digits.train.y[:512]).backward()
        opt.step()
    gm = trace(model.eval())
    x, y = digits.test.x[:24], digits.test.y[:24]
    site = relu_node(gm)
    traps = [Trap(site, torch.arange(0, 32, 4), torch.full((8,), 0.5))]
    certs = certify_samples(gm, traps, x, y, 0.01, (0.0, 1.0))
    assert certs["fractions"]["robust"] > 0.5
    assert certs["fractions"]["detect_or_robust"] >= certs["fractions"]["robust"]
    assert check_certificates(gm, traps, x, y, 0.01, (0.0, 1.0), n_points=8, seed=0).ok


# --------------------------------------------------------------------------- linear-relaxation bounds
@pytest.mark.parametrize("bounds", ["crown-ibp", "crown"])
def test_detect_or_robust_by_hand_with_linear_bounds(bounds):
    """The hand cases above hold with backward linear-relaxation bounds: the trap's pre-activation is clamped
    (x2 <= T for a quiet input), the ReLU relaxed over the clamped interval."""
    gm = trace(two_layer())
    site = relu_node(gm)
    cases = {0.4: (False, True, False), 0.2: (False, True, True), 0.5: (False, False, False)}
    for t, expected in cases.items():
        trap = Trap(site, torch.tensor([1]), torch.tensor([t]))
        r = certify_samples(gm, [trap], X, Y, 0.15, (0.0, 1.0), bounds=bounds)
        assert (r["robust"].item(), r["detect_or_robust"].item(), r["always_alarm"].item()) == expected, t
        assert r["bounds"] == bounds


def test_pre_activation_clamp_tightens_the_relaxation():
    """h = relu(z), z = x in [-1, 1] (unstable), logits [h - 0.25, 0]: intervals give h in [0, 1] and margin
    -0.25; a quiet input has h <= T = 0.1, so z <= 0.1 and the relaxation is taken over [-1, 0.1]."""
    gm = trace(_relu_margin_net(0.25))
    site = relu_node(gm)
    trap = Trap(site, torch.tensor([0]), torch.tensor([0.1]))
    x, y = torch.tensor([[0.0]]), torch.tensor([0])
    for bounds in ("ibp", "crown"):
        r = certify_samples(gm, [trap], x, y, 1.0, None, bounds=bounds)
        # margin = 0.25 - h: robust fails (h up to 1); quiet inputs have h <= 0.1: margin >= 0.15
        assert not r["robust"].item() and r["detect_or_robust"].item(), bounds
        assert torch.allclose(r["margin_detect"], torch.tensor([0.15]), atol=1e-6), bounds
        assert torch.allclose(r["margin"], torch.tensor([-0.75]), atol=1e-6), bounds
    assert check_certificates(gm, [trap], x, y, 1.0, None, n_points=64, seed=0, bounds="crown").ok


@pytest.mark.parametrize("bounds", ["crown-ibp", "crown"])
def test_linear_bounds_certificates_and_check_agree_on_a_small_cnn(bounds):
    gm, x, y, traps = small_cnn_setup()
    traps = [Trap(t.node, t.flat_indices, t.thresholds + 0.3) for t in traps]  # traps that do not always fire
    ibp = certify_samples(gm, traps, x, y, 0.03, (0.0, 1.0))
    for eps in (0.0, 0.01, 0.03):
        certs = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), batch_size=5, bounds=bounds)
        assert bool((certs["robust"] <= certs["detect_or_robust"]).all())
        # batch_points 40: several chunks of boxes, each bounded by the same method
        result = check_certificates(gm, traps, x, y, eps, (0.0, 1.0), n_points=16, seed=3, bounds=bounds,
                                    batch_points=40)
        assert result.ok, [str(v) for v in result.details]
        assert result.points == 16 * len(x)
    # never looser than intervals (same eps): every margin at least the interval one
    assert bool((certs["margin"] >= ibp["margin"] - 1e-6).all())
    assert bool((certs["margin_detect"] >= ibp["margin_detect"] - 1e-6).all())
    assert certs["fractions"]["robust"] >= ibp["fractions"]["robust"]


def _relu_margin_net(offset: float) -> nn.Module:
    """h = relu(x), logits [offset - h, 0]."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[-1.0], [0.0]]))
        net[2].bias.copy_(torch.tensor([offset, 0.0]))
    return net.eval()


def test_check_catches_an_unsound_backward_rule(monkeypatch):
    """A ReLU relaxation without the upper chord's intercept claims x in [-1, 1] keeps 0.6 - relu(x) > 0
    (0.6 - x / 2 >= 0.1); at x = 1 the margin is -0.4.  The check must object."""
    from harden.bounds.backward import BACKWARD_RULES, BackwardRule
    from harden.bounds.backward_activations import relu_relaxation

    def no_intercept(back):
        x = back.call.args[0]
        low, up, _ = relu_relaxation(x)
        A = back.A
        back.emit(x, A * torch.where(A >= 0, back.per_row(low), back.per_row(up)))

    gm = trace(_relu_margin_net(0.6))
    x, y = torch.tensor([[0.0]]), torch.tensor([0])
    assert not certify_samples(gm, [], x, y, 1.0, None, bounds="crown")["robust"].item()
    assert check_certificates(gm, [], x, y, 1.0, None, n_points=16, seed=0, bounds="crown").ok
    original = BACKWARD_RULES._entries["relu"]
    monkeypatch.setitem(BACKWARD_RULES._entries, "relu", BackwardRule(no_intercept, None, original.relaxes))
    assert certify_samples(gm, [], x, y, 1.0, None, bounds="crown")["robust"].item()   # the false claim
    result = check_certificates(gm, [], x, y, 1.0, None, n_points=16, seed=0, bounds="crown")
    assert not result.ok and result.counts.get("robust", 0) > 0


def test_cli_refuses_an_unknown_bound_method(tmp_path):
    """A typo in --bounds fails at once, in one line, before the bundle is read."""
    from typer.testing import CliRunner

    from harden.cli.app import app

    result = CliRunner().invoke(app, ["certify", str(tmp_path / "missing.hardened"), "--bounds", "deeppoly"])
    assert result.exit_code != 0
    assert "ibp, crown-ibp, crown" in result.output and "missing.hardened" not in result.output


@pytest.mark.parametrize("bounds", ["ibp", "crown-ibp", "crown"])
def test_certify_samples_reads_placement_off_its_own_pass(bounds):
    # harden certify takes the placement rows from certify_samples' unclamped pass instead of bounding the
    # boxes a second time: the rows must be those of placement() itself, and the certificates unchanged.
    gm, x, y, traps = small_cnn_setup()
    traps = [Trap(t.node, t.flat_indices, t.thresholds + 0.02) for t in traps]
    for eps in (0.0, 0.01, 0.05):
        joint = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), batch_size=5, bounds=bounds, with_placement=True)
        alone = certify_samples(gm, traps, x, y, eps, (0.0, 1.0), batch_size=5, bounds=bounds)
        assert joint["placement"] == placement(gm, traps, x, eps, (0.0, 1.0), batch_size=7, bounds=bounds)
        for key in ("robust", "detect_or_robust", "always_alarm", "margin", "margin_detect"):
            assert torch.equal(joint[key], alone[key]), key
    fractions = [v for row in joint["placement"] for k, v in row.items() if k not in ("site", "neurons")]
    assert any(0.0 < v < 1.0 for v in fractions)  # the case is not degenerate: some condition holds partly
    assert "placement" not in alone
