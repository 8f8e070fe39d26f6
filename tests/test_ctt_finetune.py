"""CTT-loose/strict: the losses on hand-built cases, and short fine-tunes on digits."""

import numpy as np
import pytest
import torch

from harden.bounds.interval import Interval
from harden.instrumentation.pipeline import instrument
from harden.methods.base import MethodSpec, Options
from harden.train.ctt_losses import certification_loss, detection_loss

T = 0.1


def test_detection_loss_counts_only_masked_activations_above_t():
    act = torch.tensor([[0.05, 0.5, 2.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    idx = torch.tensor([0, 1, 3])
    assert detection_loss(act, idx, T).tolist() == [0.5, 0.0]  # 2.0 is not masked, 0.1 is not above T


def test_strict_loss_uses_the_lower_bound_loose_the_upper():
    lo = torch.tensor([[0.0, 0.2, 0.05]])
    hi = torch.tensor([[0.3, 0.4, 0.08]])
    box = Interval(lo, hi)
    idx = torch.tensor([0, 1, 2])
    strict = certification_loss(box, idx, T, "strict")
    loose = certification_loss(box, idx, T, "loose")
    assert strict.item() == pytest.approx((T - 0.0) + 0 + (T - 0.05))
    assert loose.item() == pytest.approx(T - 0.08)
    # zero when every masked bound clears T
    done = Interval(torch.full((1, 3), 0.2), torch.full((1, 3), 0.3))
    assert certification_loss(done, idx, T, "strict").item() == 0.0
    assert certification_loss(done, idx, T, "loose").item() == 0.0


def _objective(hardened, data):
    """The fine-tuning objective at its first-epoch weights, CE + alpha * (w_D * L_D + L_C), on the training
    split, computed by the training's own loss terms with the method's recorded configuration."""
    from harden.train.finetune import FinetuneConfig, _Traps

    method = hardened.methods[0]
    recorded = method.config["finetune"]
    cfg = FinetuneConfig(**{k: v for k, v in recorded.items() if k in FinetuneConfig.__dataclass_fields__})
    masks = {s: method.head.trap(i)[0] for i, s in enumerate(method.sites)}
    traps = _Traps(hardened.classifier, method.sites, masks, cfg, data.input_range)
    with torch.no_grad():
        ce, l_d, l_c = traps.losses(data.train.x, data.train.y)
    return float(ce + cfg.alpha * (cfg.detection_weight * l_d + l_c))


@pytest.fixture(scope="module")
def strict_pair(tiny_model, digits):
    method = "ctt-strict:mask_ratio=0.05,eps=0.01,epochs=3,lr=3e-4,alpha=0.5"
    first = instrument(tiny_model, digits, [method], Options(key="ft"))
    second = instrument(tiny_model, digits, [method], Options(key="ft"))
    return first, second


def test_finetune_lowers_the_ctt_losses_and_keeps_logits_finite(strict_pair, tiny_model, digits):
    hardened, _ = strict_pair
    from harden.graph.trace import trace

    before = trace(tiny_model)
    from harden.instrumentation.hardened import HardenedModel
    from harden.methods.ctt import CTTStrict

    # the same masks on the user's weights give the starting losses
    start = HardenedModel(before, hardened.methods)
    assert _objective(hardened, digits) < _objective(start, digits)
    out = hardened.run(digits.test.x)
    assert np.isfinite(out["logits"]).all()
    assert hardened.original_state is not None
    history = hardened.methods[0].config["_history"]
    assert len(history) == 3 and all(np.isfinite(r["cross_entropy"]) for r in history)


def test_finetune_is_deterministic_for_a_key_and_seed(strict_pair):
    a, b = strict_pair
    for (k, va), (_, vb) in zip(a.classifier.state_dict().items(), b.classifier.state_dict().items()):
        assert torch.equal(va, vb), k


def test_finetuned_bundle_round_trip(strict_pair, tmp_path, digits):
    from harden.bundle.archive import load_bundle, save_bundle

    hardened, _ = strict_pair
    save_bundle(hardened, tmp_path / "s.hardened")
    loaded, manifest = load_bundle(tmp_path / "s.hardened")
    assert manifest["finetuned"] is True
    for key, value in hardened.original_state.items():
        assert torch.equal(loaded.original_state[key], value)
    a, b = hardened.run(digits.test.x), loaded.run(digits.test.x)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_only_one_finetuning_method(tiny_model, digits):
    from harden.errors import HardenError

    with pytest.raises(HardenError, match="one fine-tuning method"):
        instrument(tiny_model, digits, ["ctt-loose", "ctt-strict"])


def test_losses_are_zero_exactly_when_the_placement_holds():
    idx = torch.tensor([0, 1])
    quiet = torch.tensor([[0.0, T]])                      # at or below T: nothing detected
    assert detection_loss(quiet, idx, T).item() == 0.0
    assert detection_loss(quiet + 0.05, idx, T).item() == pytest.approx(T + 0.05)  # 0.05 stays quiet, T + 0.05 fires
    # loose needs hi >= T, strict lo >= T: a box straddling T satisfies loose only
    straddle = Interval(torch.tensor([[0.0, 0.05]]), torch.tensor([[0.2, 0.3]]))
    assert certification_loss(straddle, idx, T, "loose").item() == 0.0
    assert certification_loss(straddle, idx, T, "strict").item() == pytest.approx(T + (T - 0.05))


def test_natural_trap_rule_keeps_every_training_digit_quiet(strict_pair, digits):
    from harden.graph.analyse import feature_extractor

    hardened, _ = strict_pair
    method = hardened.methods[0]
    assert method.config["trap_rule"] == "natural"
    _, *acts = feature_extractor(hardened.classifier, method.sites)(digits.train.x)
    raised = 0
    for i, act in enumerate(acts):
        indices, thresholds = method.head.trap(i)
        assert (thresholds >= 1e-4).all()
        assert (act.flatten(1).index_select(1, indices) <= thresholds).all()
        raised += int((thresholds > 1e-4).sum())
    assert raised > 0  # the rule did something on this model: some trap fires naturally at T


def test_finetune_history_has_the_epoch_figures(strict_pair):
    hardened, _ = strict_pair
    config = hardened.methods[0].config
    history = config["_history"]
    assert 1 <= config["finetune"]["best_epoch"] <= len(history)
    for record in history:
        for field in ("cross_entropy", "l_d", "l_c", "accuracy", "fpr", "cal_l_d", "cal_l_c"):
            assert np.isfinite(record[field]), field
        assert 0.0 <= record["fpr"] <= 1.0 and 0.0 <= record["accuracy"] <= 1.0


class _NormNet(torch.nn.Module):
    """Batch norm (2-d and 1-d), in-place ReLU, average pooling and a view: the stacked pass's other layers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(4 * 4 * 4, 16)
        self.bn1 = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = torch.relu(self.bn1(self.fc(x.view(x.size(0), -1))))
        return self.out(x)


class _ShiftNet(_NormNet):
    """An op the stacked pass does not take (x - 0.5 is not monotone in a stacked operand's sense): fallback."""

    def forward(self, x):
        return super().forward(x - 0.5)


def _traps_for(model, digits, kind="strict", eps=0.05):
    from harden.graph.trace import trace
    from harden.methods.base import FitContext
    from harden.methods.ctt import CTTStrict
    from harden.train.finetune import FinetuneConfig, _Traps

    gm = trace(model)
    sites, masks, _ = CTTStrict().plan(FitContext(gm=gm, data=digits, options=Options(key="stk"),
                                                  settings=MethodSpec.of("ctt-strict", mask_ratio=0.2).settings))
    traps = _Traps(gm, sites, masks, FinetuneConfig(kind=kind, eps=eps), digits.input_range)
    for p in gm.parameters():
        p.requires_grad_(True)
    return gm, traps


def _loss_and_grads(gm, traps, x, y):
    ce, l_d, l_c = traps.losses(x, y)
    values = torch.stack([ce, l_d, l_c])
    grads = torch.autograd.grad(ce + 0.3 * l_d + 0.7 * l_c, [p for p in gm.parameters()])
    return values.detach(), grads


@pytest.mark.parametrize("make", ["tiny", "norm"])
@pytest.mark.parametrize("kind", ["loose", "strict"])
def test_stacked_pass_gives_the_general_paths_losses_and_gradients(make, kind, tiny_model, digits, one_thread):
    import copy

    torch.manual_seed(1)
    model = copy.deepcopy(tiny_model) if make == "tiny" else _NormNet()
    if make == "norm":  # non-trivial running statistics and affine parameters, some scales negative
        for bn in (model.bn, model.bn1):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(bn.weight, -1.5, 1.5)
    gm, traps = _traps_for(model, digits, kind)
    x, y = digits.train.x[:48], digits.train.y[:48]
    traps.losses(x, y)                       # the first batch checks the stacked pass against the general one
    assert traps.stacked is not None
    stacked_values, stacked_grads = _loss_and_grads(gm, traps, x, y)
    runner, traps.stacked = traps.stacked, None
    general_values, general_grads = _loss_and_grads(gm, traps, x, y)
    traps.stacked = runner
    assert torch.allclose(stacked_values, general_values, rtol=1e-5, atol=1e-6)
    assert general_values[2] > 0  # the certification term is active, so its gradient is compared too
    for a, b in zip(stacked_grads, general_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max())))


def test_an_op_the_stacked_pass_does_not_take_keeps_the_general_path(digits, one_thread):
    gm, traps = _traps_for(_ShiftNet(), digits)
    assert traps.stacked is None
    ce, l_d, l_c = traps.losses(digits.train.x[:16], digits.train.y[:16])
    assert all(torch.isfinite(v) for v in (ce, l_d, l_c))


def test_ctt_strict_graph_agrees_at_every_onnxruntime_level_and_as_portable_float32(strict_pair):
    from portability import check_every_runtime_setting

    check_every_runtime_setting(strict_pair[0])
def test_a_finetuning_that_kept_the_users_weights_is_no_finetuned_bundle(tiny_model, digits, tmp_path, one_thread):
    from harden.bundle.archive import load_bundle, save_bundle
    from harden.graph.trace import trace

    # a learning rate that wrecks the classifier at every check: the training keeps the original weights
    hardened = instrument(tiny_model, digits, ["ctt-strict:mask_ratio=0.05,eps=0.01,epochs=1,lr=50"],
                          Options(key="ft"))
    assert hardened.methods[0].config["finetune"]["best_epoch"] == 0
    for key, value in trace(tiny_model).state_dict().items():
        assert torch.equal(hardened.classifier.state_dict()[key], value), key
    assert hardened.original_state is None
    save_bundle(hardened, tmp_path / "kept.hardened")
    _, manifest = load_bundle(tmp_path / "kept.hardened")
    assert manifest["finetuned"] is False
