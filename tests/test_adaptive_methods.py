"""Adaptive attacks for every method: surrogates equal the shipped detectors, the attack reaches a known optimum,
the policy's k is respected, key-unknown attackers and proxies, L2, and the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
from harden.methods.surrogates import SURROGATES, surrogates_for
from harden.cli.app import app
from harden.detectors.torch_eval import TorchOnnx
from harden.errors import HardenError
from harden.graph.trace import trace
from harden.instrumentation.hardened import HardenedModel
from harden.instrumentation.pipeline import instrument
from harden.bundle.archive import load_bundle, save_bundle
from harden.methods.base import METHODS, FittedMethod, MethodSpec, Options
from harden.methods.ctt import TrapHead
from harden.detectors.policy import AlarmPolicy

MM = {"attacks": ["fgsm:eps=0.2"], "max_train": 300, "svm_c": 10.0, "svm_gamma": 0.05}
LAN = {"g_steps": 200, "f2_steps": 300, "beta": 2.0}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest's: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def bundles(tiny_model, digits, tmp_path_factory):
    """ctt-lite, nic, mismatch and lan on the tiny CNN, each through a bundle round trip."""
    folder = tmp_path_factory.mktemp("adaptive-methods")
    made = {
        "ctt-lite": instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05"], Options(key="am", fpr=0.05)),
        "nic": instrument(tiny_model, digits, ["nic"], Options(key="am", fpr=0.05)),
        "mismatch": instrument(tiny_model, digits, [MethodSpec.of("mismatch", **MM)], Options(key="am", fpr=0.05)),
        "lan": instrument(tiny_model, digits, [MethodSpec.of("lan", **LAN)], Options(key="am", fpr=0.05)),
    }
    out = {}
    for name, hardened in made.items():
        save_bundle(hardened, folder / f"{name}.hardened")
        out[name] = load_bundle(folder / f"{name}.hardened")[0]
    return out


def test_every_method_has_a_surrogate():
    from harden.methods import load_all  # noqa: F401

    assert set(METHODS.names()) <= set(SURROGATES.names())


def _raw(hardened, x, smooth, **knowledge):
    (surrogate,) = surrogates_for(hardened, knowledge.pop("knowledge", None)).values()
    from harden.evaluation.adaptive import _Target

    target = _Target(hardened.classifier, {"m": surrogate})
    target.prepare(x)
    return target(x, smooth=smooth)[1]["m"]


@pytest.mark.parametrize("name", ["ctt-lite", "nic", "mismatch", "lan"])
def test_exact_surrogate_is_the_shipped_detector(bundles, digits, name):
    hardened = bundles[name]
    x = digits.test.x[:150]
    shipped = hardened.raw_scores(hardened.torch_outputs(x))[:, 0]
    exact = _raw(hardened, x, smooth=False).detach().double().numpy()
    assert np.abs(exact - shipped).max() <= 1e-4 * max(1.0, np.abs(shipped).max())
    # the smoothed score has a gradient for (nearly) every input; CTT's hinges wherever a trap fires (noise)
    if name == "ctt-lite":
        x = (x + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_raw(hardened, xg, smooth=True).sum(), xg)
    moving = grad.flatten(1).abs().sum(1) > 0
    if name == "ctt-lite":
        firing = hardened.run(x.numpy())["alarm"]
        assert firing.mean() > 0.5 and np.array_equal(moving.numpy(), firing)
    else:
        assert moving.float().mean() > 0.9


@pytest.mark.parametrize("name", ["nic", "mismatch"])
def test_detector_graph_in_torch_matches_scikit_learn(bundles, digits, name):
    hardened = bundles[name]
    method = hardened.methods[0]
    features = hardened.torch_outputs(digits.test.x[:100])[method.feature_output]
    reference = method.detector.score(features)
    ours = TorchOnnx(method.detector.onnx_model())(torch.from_numpy(features)).detach().numpy()
    assert np.abs(ours - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
    widened = TorchOnnx(method.detector.onnx_model(), widen=10.0)(torch.from_numpy(features)).detach().numpy()
    assert np.abs(widened - reference).max() > 1e-3   # widen changes the kernel


# --------------------------------------------------------------------------- a toy whose optimum is known


class Toy(nn.Module):
    """x in [0, 1]^2; sites h = relu([x1, x2, 1 - x1]); logits = (h1, h2): class 0 while x1 > x2."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 3)
        self.out = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
            self.hidden.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
            self.out.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def _trap_method(name: str, site: str, neuron: int, threshold: float) -> FittedMethod:
    head = TrapHead([3], [1])
    head.indices_0.fill_(neuron)
    head.thresholds_0.fill_(threshold)
    return FittedMethod(name, {"sites": [site], "sizes": [3], "counts": [1]}, head, [site], sites=[site])


def _toy(margins: np.ndarray, traps: list[tuple[str, int, float]], k: int):
    """Inputs x = (0.5, 0.5 - m), class 0 by margin m; each trap (method, neuron, T) alarms when h_neuron > T.
    A trap on h3 = 1 - x1 at 0.5 + tau lets x1 fall by tau; one on h2 = x2 at T lets x2 rise to T."""
    gm = trace(Toy())
    site = next(n.name for n in gm.graph.nodes if "relu" in n.name)
    methods = [_trap_method(name, site, neuron, threshold) for name, neuron, threshold in traps]
    policy = AlarmPolicy([0.0] * len(methods), [1.0] * len(methods), k)
    hardened = HardenedModel(gm, methods, policy, facts={"thresholds": {m.name: 0.0 for m in methods}})
    x = np.stack([np.full_like(margins, 0.5), 0.5 - margins], 1).astype(np.float32)
    return hardened, x, np.zeros(len(x), dtype=np.int64)


def _success(hardened, x_adv, y):
    out = hardened.run(x_adv)
    return (out["logits"].argmax(1) != y) & ~out["alarm"]


EPS = 0.1
MARGINS = np.round(np.arange(0.015, 0.29, 0.01), 3)   # every optimum below lies 0.005 from the nearest margin


def test_adaptive_attack_reaches_the_known_optimum_and_the_blind_attack_does_not():
    # x1 may fall by tau = 0.04 (trap on h3), x2 rise by eps: fooled and quiet exactly when m < eps + tau
    hardened, x, y = _toy(MARGINS, [("ctt-lite", 2, 0.5 + 0.04)], k=1)
    settings = AdaptiveSettings(eps=EPS, steps=60, supports=("all",))
    optimum = MARGINS < EPS + 0.04
    adaptive = adaptive_attack(hardened, x, y, settings, input_range=(0.0, 1.0))
    assert np.array_equal(_success(hardened, adaptive["x_adv"], y), optimum)
    assert np.array_equal(adaptive["won"], optimum)
    assert np.abs(adaptive["x_adv"] - x).max() <= EPS + 1e-6
    blind = adaptive_attack(hardened, x, y, settings, input_range=(0.0, 1.0), lams=(0.0,))
    assert _success(hardened, blind["x_adv"], y).sum() < optimum.sum()


def test_the_policy_k_is_the_attackers_target():
    # a: x1 may fall by 0.04.  b: x2 may rise to 0.45, i.e. by m - 0.05 (margins >= 0.065: clean inputs quiet).
    # any: a + b <= 0.04 + m - 0.05 < m, never fooled quietly.  k = 2 of 2 (one quiet method suffices): keep b
    # quiet and move x1 by eps: eps + m - 0.05 > m while m - 0.05 <= eps; beyond, eps + eps > m: m < 0.2.
    margins = MARGINS[MARGINS >= 0.065]
    traps = [("ctt-lite", 2, 0.5 + 0.04), ("ctt-strict", 1, 0.45)]
    settings = AdaptiveSettings(eps=EPS, steps=80, supports=("all",))
    for k, optimum in ((1, np.zeros(len(margins), dtype=bool)), (2, margins < 2 * EPS)):
        hardened, x, y = _toy(margins, traps, k=k)
        assert not hardened.run(x)["alarm"].any()
        result = adaptive_attack(hardened, x, y, settings, input_range=(0.0, 1.0))
        assert np.array_equal(_success(hardened, result["x_adv"], y), optimum), k


def test_l2_attack_stays_in_its_ball_and_reaches_the_optimum():
    tau = 0.04
    hardened, x, y = _toy(MARGINS, [("ctt-lite", 2, 0.5 + tau)], k=1)
    result = adaptive_attack(hardened, x, y, AdaptiveSettings(eps=EPS, norm="l2", steps=80, supports=("all",)),
                             input_range=(0.0, 1.0))
    assert np.linalg.norm(result["x_adv"] - x, axis=1).max() <= EPS + 1e-6
    # x1 down by a <= tau, x2 up by b, a^2 + b^2 <= eps^2: the most is tau + sqrt(eps^2 - tau^2) = 0.1317
    bound = tau + np.sqrt(EPS**2 - tau**2)
    clear = np.abs(MARGINS - bound) > 0.005
    assert np.array_equal(_success(hardened, result["x_adv"], y)[clear], (MARGINS < bound)[clear])


def test_bad_settings_are_one_line(bundles, digits):
    x, y = digits.test.x[:4].numpy(), digits.test.y[:4].numpy()
    for bad, match in ((dict(norm="l3"), "adaptive-norm"), (dict(eps=float("nan")), "eps"),
                       (dict(attacker="oracle"), "adaptive-attacker"), (dict(step_rules=("zigzag",)), "step rule")):
        with pytest.raises(HardenError, match=match):
            adaptive_attack(bundles["ctt-lite"], x, y, AdaptiveSettings(**bad), input_range=digits.input_range)


# --------------------------------------------------------------------------- key-unknown


def test_key_unknown_ctt_holds_every_neuron_of_the_trap_sites(bundles, digits):
    hardened = bundles["ctt-lite"]
    from harden.methods.surrogates import KEY_UNKNOWN, Knowledge

    knowledge = Knowledge(KEY_UNKNOWN, digits.train.x)
    (surrogate,) = surrogates_for(hardened, knowledge).values()
    assert surrogate.calibration == (0.0, 1.0)
    # its own rule never fires on the training split it took its maxima from
    raw = _raw(hardened, digits.train.x[:300], smooth=False, knowledge=knowledge)
    assert float(raw.max()) <= 0.0
    with pytest.raises(HardenError, match="training split"):
        surrogates_for(hardened, Knowledge(KEY_UNKNOWN, None))


def test_key_unknown_nic_redraws_the_transforms(bundles, digits):
    from harden.methods.surrogates import KEY_UNKNOWN, Knowledge

    hardened = bundles["nic"]
    (known,) = surrogates_for(hardened, Knowledge()).values()
    (unknown,) = surrogates_for(hardened, Knowledge(KEY_UNKNOWN, digits.train.x)).values()
    assert not torch.equal(known.head.scale_0_0, unknown.head.scale_0_0)
    assert torch.equal(known.smooth_head.probe_0_0.weight, unknown.smooth_head.probe_0_0.weight)


@pytest.mark.parametrize("name", ["mismatch", "lan"])
def test_key_unknown_mismatch_and_lan_need_a_proxy(bundles, digits, name):
    from harden.methods.surrogates import KEY_UNKNOWN, Knowledge

    with pytest.raises(HardenError, match="adaptive-proxy"):
        surrogates_for(bundles[name], Knowledge(KEY_UNKNOWN, digits.train.x))


def test_proxy_attack_is_judged_by_the_target(tiny_model, bundles, digits):
    proxy = instrument(tiny_model, digits, [MethodSpec.of("mismatch", **MM)], Options(key="another", fpr=0.05))
    target = bundles["mismatch"]
    x, y = digits.test.x[:40].numpy(), digits.test.y[:40].numpy()
    result = adaptive_attack(target, x, y, AdaptiveSettings(eps=0.2, steps=20, supports=("all",)),
                             input_range=digits.input_range, proxy=proxy)
    assert result["attacker"] == "key-unknown" and result["proxy"]
    assert np.abs(result["x_adv"] - x).max() <= 0.2 + 1e-6
    # "won" is the proxy's verdict; the target's own alarm is what counts, and it may disagree
    out = target.run(result["x_adv"])
    assert ((out["logits"].argmax(1) != y) & result["won"]).sum() == result["won"].sum()


# --------------------------------------------------------------------------- CLI


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_adaptive_nic_l2_both_attackers(bundles, tmp_path):
    path = tmp_path / "nic.hardened"
    save_bundle(bundles["nic"], path)
    result = invoke("evaluate", path, "--adaptive", "--adaptive-norm", "l2", "--adaptive-eps", "1.0",
                    "--adaptive-steps", "10", "--limit", "12", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["adaptive"]
    assert report["norm"] == "l2" and report["methods"] == ["nic"]
    for key in ("type_i", "type_ii", "key_unknown"):
        row = report[key]
        assert 0 <= row["success"] <= min(row["fooled"], row["evaded"]) <= 1
        assert row["mean_l2"] <= 1.0 + 1e-5
    assert report["type_ii"]["gain"] == pytest.approx(report["type_i"]["fooled"] - report["type_ii"]["success"])


def test_cli_mismatch_key_unknown_is_skipped_unless_asked(bundles, tmp_path):
    path = tmp_path / "mm.hardened"
    save_bundle(bundles["mismatch"], path)
    result = invoke("evaluate", path, "--adaptive", "--adaptive-steps", "5", "--limit", "8")
    assert result.exit_code == 0, result.output
    assert "adaptive-proxy" in " ".join(result.output.split())
    asked = invoke("evaluate", path, "--adaptive", "--adaptive-attacker", "key-unknown", "--limit", "8")
    assert asked.exit_code == 2 and "adaptive-proxy" in asked.output and "Traceback" not in asked.output
    wrong = invoke("evaluate", path, "--adaptive", "--adaptive-attacker", "oracle", "--limit", "8")
    assert wrong.exit_code == 2 and "key-known" in wrong.output


def test_original_weights_get_their_own_undefended_row(bundles, digits):
    import copy

    from harden.evaluation.evaluate import evaluate_adaptive

    hardened = bundles["ctt-lite"]
    original = copy.deepcopy(hardened.classifier)
    with torch.no_grad():
        for p in original.parameters():
            p.mul_(0.9)
    x, y = digits.test.x[:30].numpy(), digits.test.y[:30].numpy()
    report = evaluate_adaptive(hardened, hardened.run, x, y, AdaptiveSettings(eps=0.2, steps=10),
                               input_range=digits.input_range, num_classes=10, original=original,
                               attackers=("key-known",))
    with torch.no_grad():
        correct = original(torch.from_numpy(x)).argmax(1).numpy() == y
    assert report["original"]["n_correct"] == int(correct.sum())
    assert 0.0 < report["original"]["fooled"] <= 1.0
    assert "key_unknown" not in report and report["type_ii"]["gain"] is not None


def test_halo_supports_dilate_the_ink():
    from harden.evaluation.adaptive import _movable

    x = torch.zeros(1, 2, 9, 9)
    x[0, 1, 4, 4] = 0.7                       # one ink value, in the second channel
    assert torch.equal(_movable(x, 0.0, "ink"), (x > 0).float())
    for r in (1, 2, 3):
        halo = _movable(x, 0.0, f"halo{r}")
        window = torch.zeros(9, 9)
        window[4 - r : 5 + r, 4 - r : 5 + r] = 1.0
        assert torch.equal(halo[0, 0], window) and torch.equal(halo[0, 1], window)   # every channel
    assert torch.equal(_movable(x, 0.0, "all"), torch.ones_like(x))
