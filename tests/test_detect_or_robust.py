"""The detect-or-robust fine-tuning objective: the loss is the certificate, it trains, and what it certifies holds."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from harden.certification.certify import Trap, certify_samples
from harden.graph.trace import trace
from harden.train.ctt_losses import certificate_hinge
from harden.train.margin_bounds import MarginBounds
from tests.box_toys import trained_two_input_toy, two_input_data


def two_layer() -> nn.Module:
    """h = relu(x) (W1 = I, b1 = 0), logits = h: the certificate can be read off by hand (tests/test_certify.py)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.eye(2))
        net[2].bias.zero_()
    return net.eval()


def _site(gm) -> tuple[str, str]:
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU))
    return relu.name, relu.all_input_nodes[0].name


X = torch.tensor([[0.6, 0.4]])
Y = torch.tensor([0])


@pytest.mark.parametrize("eps,threshold,holds", [
    (0.05, None, True),    # robust: margin >= 0.55 - 0.45 = 0.1 on the whole box
    (0.15, None, False),   # not robust and no trap: margin down to 0.45 - 0.55 = -0.1
    (0.15, 0.4, True),     # inputs keeping h2 <= 0.4 have margin >= 0.05
    (0.15, 0.2, True),     # h2 >= 0.25 > 0.2 on the whole box: every input alarms
    (0.15, 0.5, False),    # h2 may reach 0.5 quietly: margin down to -0.05
    (0.25, 0.45, False),   # h1 down to 0.35 while h2 stays <= 0.45 quietly
])
def test_the_loss_is_zero_exactly_when_the_certificate_holds(eps, threshold, holds):
    gm = trace(two_layer())
    site, pre = _site(gm)
    traps = [] if threshold is None else [Trap(site, torch.tensor([1]), torch.tensor([threshold]))]
    verdict = certify_samples(gm, traps, X, Y, eps, (0.0, 1.0))["detect_or_robust"]
    bounds = MarginBounds(gm, [pre], [torch.tensor([1])], (0.0, 1.0))
    caps = None if threshold is None else {pre: torch.tensor([threshold])}
    c = bounds(X, Y, eps, caps)
    loss = certificate_hinge(c.margin, c.always)
    assert verdict.tolist() == [holds]
    assert (loss == 0).tolist() == [holds]
    # asking for a margin: the loss stays positive until the bound clears it (an always-alarming box is done)
    assert (certificate_hinge(c.margin, c.always, kappa=1.0) == 0).tolist() == [bool(c.always.item())]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.flatten(self.pool(self.relu1(self.conv(x)))))))


def test_training_margin_equals_certify_ibp_margin(digits, one_thread):
    """The bound fine-tuning pushes is the one harden certify --bounds ibp reports, stacked pass or not."""
    torch.manual_seed(0)
    gm = trace(_Net())
    sites = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    pres = [next(n for n in gm.graph.nodes if n.name == s).all_input_nodes[0].name for s in sites]
    generator = torch.Generator().manual_seed(0)
    sizes = {sites[0]: 6 * 8 * 8, sites[1]: 24}
    masks = [torch.randperm(sizes[s], generator=generator)[: sizes[s] // 4].sort().values for s in sites]
    x, y = digits.test.x[:40], digits.test.y[:40]
    thresholds = [torch.rand(len(m), generator=generator) * 0.3 for m in masks]
    traps = [Trap(s, m, t) for s, m, t in zip(sites, masks, thresholds)]
    reference = certify_samples(gm, traps, x, y, 0.02, (0.0, 1.0))
    bounds = MarginBounds(gm, pres, masks, (0.0, 1.0))
    first = bounds(x, y, 0.02, dict(zip(pres, thresholds)))       # checks the stacked pass against the general
    assert bounds.stacked is not None
    stacked = bounds(x, y, 0.02, dict(zip(pres, thresholds)))
    for c in (first, stacked):
        assert torch.allclose(c.margin, reference["margin_detect"], atol=1e-4)
        assert torch.equal(c.always, reference["always_alarm"])
    plain = bounds(x, y, 0.02, None)
    assert torch.allclose(plain.margin, reference["margin"], atol=1e-4)
    assert (stacked.margin >= plain.margin - 1e-5).all()


def test_the_objective_is_differentiable_and_falls_on_a_short_fine_tune(tiny_model, digits, one_thread):
    import copy

    from harden.graph.trace import trace
    from harden.methods.base import FitContext, MethodSpec, Options
    from harden.methods.ctt import CTTStrict
    from harden.train.finetune import FinetuneConfig, _Traps, finetune_ctt

    gm = trace(copy.deepcopy(tiny_model))
    sites, masks, _ = CTTStrict().plan(FitContext(gm=gm, data=digits, options=Options(key="dor"),
                                                  settings=MethodSpec.of("ctt-strict", mask_ratio=0.1).settings))
    cfg = FinetuneConfig(kind="strict", eps=0.01, objective="detect-or-robust", steps=60, check_every=20,
                         eps_warmup=0.0, max_accuracy_drop=1.0, patience=0)
    x, y = digits.train.x[:200], digits.train.y[:200]

    def objective(model):
        traps = _Traps(model, sites, masks, cfg, digits.input_range)
        traps.objective.refresh(traps.thresholds(digits.train.x))
        return traps, traps.losses(x, y)

    traps, (ce, l_d, l_c) = objective(gm)
    params = [p for p in gm.parameters()]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(l_c, params, allow_unused=True)
    assert l_c > 0 and any(g is not None and g.abs().sum() > 0 for g in grads)
    before = float((ce + cfg.detection_weight * l_d + l_c).detach())
    for p in params:
        p.requires_grad_(False)
    finetune_ctt(gm, sites, masks, (digits.train.x, digits.train.y), (digits.calibration.x, digits.calibration.y),
                 digits.input_range, cfg)
    _, (ce, l_d, l_c) = objective(gm)
    assert float(ce + cfg.detection_weight * l_d + l_c) < before


def test_certify_agrees_with_a_dense_grid_of_the_box_on_a_trained_toy(one_thread):
    """Trained with the detect-or-robust objective, certified by harden certify (ibp and crown): no point of a
    dense grid over any certified box is both quiet and misclassified."""
    from harden.graph.trace import trace
    from harden.train.finetune import FinetuneConfig, finetune_ctt

    model, x, y = trained_two_input_toy()
    gm = trace(model.eval())
    sites = ["relu1", "relu2"]
    masks = {"relu1": torch.tensor([0, 3, 5, 9]), "relu2": torch.tensor([1, 2, 7, 11])}
    eps = 0.04
    cfg = FinetuneConfig(kind="strict", eps=eps, objective="detect-or-robust", steps=200, check_every=50,
                         max_accuracy_drop=1.0, patience=0, batch_size=100)
    history, best, thresholds, _ = finetune_ctt(gm, sites, masks, (x[:400], y[:400]), (x[400:], y[400:]),
                                                (0.0, 1.0), cfg)
    traps = [Trap(s, masks[s], thresholds[s]) for s in sites]
    xt, yt = two_input_data(80, 1)
    steps = torch.linspace(-1.0, 1.0, 41)
    offsets = torch.tensor(list(itertools.product(steps, steps))).reshape(-1, 1, 1, 2) * eps
    checked = 0
    for bounds in ("ibp", "crown"):
        verdict = certify_samples(gm, traps, xt, yt, eps, (0.0, 1.0), bounds=bounds)
        for i in torch.nonzero(verdict["detect_or_robust"]).flatten().tolist():
            points = (xt[i] + offsets).clamp(0.0, 1.0)
            with torch.no_grad():
                logits = gm(points)
                h1 = gm.relu1(gm.fc1(gm.flatten(points)))
                h2 = gm.relu2(gm.fc2(h1))
            alarm = (h1[:, masks["relu1"]] > thresholds["relu1"]).any(1) | \
                    (h2[:, masks["relu2"]] > thresholds["relu2"]).any(1)
            wrong = logits.argmax(1) != yt[i]
            assert not (wrong & ~alarm).any(), f"{bounds}: sample {i} certified but a quiet grid point is misclassified"
            checked += 1
    assert checked > 20   # the certificate is not vacuous on this toy


def test_a_detect_or_robust_bundle_is_never_contradicted(tiny_model, digits, one_thread):
    """On a bundle fine-tuned for the certificate: the sampling check finds no contradiction and no adaptive
    attack within eps breaks a certified input, judged by the hardened model (the ONNX graph's reference)."""
    from harden.api import ctt_traps
    from harden.certification.certify import check_certificates
    from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import MethodSpec, Options

    eps = 0.02
    hardened = instrument(tiny_model, digits,
                          [MethodSpec.of("ctt-strict", mask_ratio=0.05, eps=eps, objective="detect-or-robust", steps=40)],
                          Options(key="dor-e2e"))
    assert hardened.methods[0].config["finetune"]["objective"] == "detect-or-robust"
    x, y = digits.test.x[:30], digits.test.y[:30]
    traps = ctt_traps(hardened)
    checked = check_certificates(hardened.classifier, traps, x, y, eps, digits.input_range, 8, bounds="crown")
    assert checked.ok, checked.to_dict()
    held = certify_samples(hardened.classifier, traps, x, y, eps, digits.input_range,
                           bounds="crown")["detect_or_robust"].numpy()

    def judge(batch):
        out = hardened.run(batch)
        return out["logits"].argmax(1), out["alarm"]

    def successes(radius):
        result = adaptive_attack(hardened, x.numpy(), y.numpy(), AdaptiveSettings(eps=radius, steps=10),
                                 input_range=digits.input_range, judge=judge)
        predicted, alarm = judge(result["x_adv"])
        return (predicted != y.numpy()) & ~alarm

    assert held.sum() > 0
    assert not (successes(eps) & held).any()
    assert successes(0.3).any()   # the attack is not vacuous


def test_the_objective_is_an_option_of_ctt_strict():
    """``--method ctt-strict:objective=...`` reaches the fine-tuning config; an unknown objective is one clear error."""
    from harden.errors import HardenError
    from harden.methods import load_all  # noqa: F401  (registers every method)
    from harden.methods.base import parse_method
    from harden.train.finetune import FinetuneConfig

    spec = parse_method("ctt-strict:objective=detect-or-robust,cert_margin=0.1,eps_warmup=0.25,eps=0.02")
    cfg = FinetuneConfig(kind="strict", eps=spec.settings.eps, **spec.settings.finetune_overrides())
    assert (cfg.objective, cfg.cert_margin, cfg.eps_warmup) == ("detect-or-robust", 0.1, 0.25)
    assert (cfg.alpha_every, cfg.lr) == (0, 1e-3)          # the objective's defaults where the user gave none
    assert FinetuneConfig(kind="strict").alpha_every == 4   # the paper's objective keeps the loop's
    with pytest.raises(HardenError, match="objective"):
        parse_method("ctt-strict:objective=flow-certificate-typo")
    with pytest.raises(HardenError, match="eps_warmup"):
        parse_method("ctt-strict:eps_warmup=1.5")
