"""Attack parsing and every registered ART attack on a tiny seeded CNN (8x8 digits, trained in the test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import digits_arrays, train_tiny
from harden.attacks.catalog import ATTACKS, AttackSpec, parse_attack, run_attack
from harden.errors import HardenError

RANGE = (0.0, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def digits_small():
    return digits_arrays()


@pytest.fixture(scope="module")
def tiny(digits_small):
    x, y = digits_small
    torch.manual_seed(0)
    return train_tiny(Tiny(), torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200]), epochs=6, lr=1e-2)


@pytest.fixture(scope="module")
def batch(digits_small, tiny):
    x, y = digits_small
    x, y = x[1200:1224], y[1200:1224]
    with torch.no_grad():
        acc = (tiny(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc > 0.8, f"the tiny model should learn the digits (accuracy {acc:.2f})"
    return x, y


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# ----------------------------------------------------------------------------- parsing


def test_parse_name_only_and_params():
    assert parse_attack("deepfool") == AttackSpec("deepfool", {})
    spec = parse_attack(" PGD : eps = 0.1 , steps=20 ")
    assert spec.name == "pgd"
    assert spec.params == {"eps": 0.1, "steps": 20}
    assert isinstance(spec.params["steps"], int)
    assert spec.label() == "pgd:eps=0.1,steps=20"


def test_label_is_canonical_and_round_trips():
    spec = parse_attack("pgd:steps=20,eps=0.1")
    assert spec.label() == "pgd:eps=0.1,steps=20"  # builder order, not the user's
    assert parse_attack(spec.label()) == spec
    assert parse_attack("fgsm:eps=1").label() == "fgsm:eps=1"
    assert parse_attack("fgsm:eps=1e-4").label() == "fgsm:eps=0.0001"
    assert parse_attack("cw-l2:confidence=0.5").label() == "cw:confidence=0.5"  # alias -> canonical name
    assert hash(parse_attack("pgd:eps=0.1,steps=20")) == hash(parse_attack("pgd:steps=20,eps=0.1"))


def test_defaults_resolved():
    assert parse_attack("bim:eps=0.2").resolved() == {"eps": 0.2, "eps_step": pytest.approx(0.02), "steps": 10}
    pgd = parse_attack("pgd:eps=0.1,steps=20").resolved()
    assert pgd["eps_step"] == pytest.approx(2.5 * 0.1 / 20) and pgd["restarts"] == 1 and pgd["norm"] == "inf"
    cw = parse_attack("cw").resolved()
    assert cw["learning_rate"] == 0.01 and cw["confidence"] == 0.1 and cw["binary_search_steps"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty attack"),
        ("   ", "empty attack"),
        ("nope", "unknown attack 'nope'; supported: "),
        (":eps=0.1", "has no name"),
        ("fgsm:", "nothing after ':'"),
        ("fgsm:eps", "is not key=value"),
        ("fgsm:eps=", "is not key=value"),
        ("fgsm:=0.1", "is not key=value"),
        ("fgsm:eps=0.1,", "is not key=value"),
        ("fgsm:eps=0.1,eps=0.2", "given twice"),
        ("fgsm:steps=3", "has no option 'steps'; valid: eps, norm"),
        ("fgsm:eps=abc", "is not a number"),
        ("fgsm:eps=nan", "must be finite"),
        ("fgsm:eps=-0.1", "must be >= 0"),
        ("pgd:eps=0", "must be > 0"),
        ("pgd:steps=2.5", "must be a whole number"),
        ("pgd:steps=0", "must be >= 1"),
        ("pgd:norm=3", "is not one of inf, 1, 2"),
        ("bim:eps_step=0", "must be > 0"),
        ("jsma:gamma=2", "must be <= 1"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(HardenError) as err:
        parse_attack(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_name_lists_supported():
    with pytest.raises(HardenError) as err:
        parse_attack("fgm:eps=0.1")
    for name in ("fgsm", "bim", "pgd", "deepfool", "cw", "cw-l2", "jsma", "hopskipjump", "boundary"):
        assert name in str(err.value)


def test_every_builder_documents_every_parameter():
    for name in ATTACKS:
        builder = ATTACKS.get(name)
        doc = builder.__doc__
        assert len(builder.summary) > 40
        for p in builder.params:
            assert f"    {p.name}: " in doc and " = " in doc and p.doc in doc


# ----------------------------------------------------------------------------- running

# Budgets small enough for a test; each attack runs on 24 8x8 digits.
QUICK = {
    "fgsm": "fgsm:eps=0.2",
    "bim": "bim:eps=0.2",
    "pgd": "pgd:eps=0.2",
    "deepfool": "deepfool:max_iter=20",
    "cw": "cw:max_iter=10,initial_const=1",
    "cw-l2": "cw-l2:max_iter=5",
    "jsma": "jsma:gamma=0.2",
    "hopskipjump": "hopskipjump:max_iter=2,max_eval=50,init_eval=10,init_size=20",
    "boundary": "boundary:max_iter=5,num_trial=5,sample_size=5,init_size=20",
    "noise": "noise",
    "blur": "blur",
    "saltpepper": "saltpepper",
    "stadv": "stadv:budget=0,delta=0.5,steps=10,search_steps=1,lr=0.05",
}


def test_quick_list_covers_the_registry():
    assert sorted(QUICK) == ATTACKS.names()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_every_attack_runs_inside_the_range(name, tiny, batch):
    x, y = batch
    spec = parse_attack(QUICK[name])
    x_adv = run_attack(tiny, spec, x, y, input_range=RANGE, num_classes=10, seed=0, batch_size=16)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.isfinite(x_adv).all()
    assert x_adv.min() >= RANGE[0] and x_adv.max() <= RANGE[1]
    assert not np.array_equal(x_adv, x), f"{name} changed nothing"
    bound = ATTACKS.get(spec.name).linf_bound
    eps = bound(spec.resolved()) if bound else None
    if name in ("fgsm", "bim", "pgd"):
        assert eps == spec.params["eps"]
    if eps is not None:
        assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert accuracy(tiny, x_adv, y) < accuracy(tiny, x, y), f"{name} did not lower the accuracy"


def test_fgsm_changes_inputs_and_lowers_accuracy(tiny, batch):
    x, y = batch
    x_adv = run_attack(tiny, parse_attack("fgsm:eps=0.3"), x, y, input_range=RANGE, num_classes=10)
    assert (np.abs(x_adv - x).reshape(len(x), -1).max(1) > 0.29).all()
    assert accuracy(tiny, x_adv, y) <= accuracy(tiny, x, y) - 0.3


def test_fgsm_eps_zero_is_the_identity(tiny, batch):
    x, y = batch
    x_adv = run_attack(tiny, parse_attack("fgsm:eps=0"), x, y, input_range=RANGE, num_classes=10)
    np.testing.assert_array_equal(x_adv, x)


def test_l2_fgm_stays_in_the_l2_ball(tiny, batch):
    x, y = batch
    x_adv = run_attack(tiny, parse_attack("fgsm:eps=1.0,norm=2"), x, y, input_range=RANGE, num_classes=10)
    assert np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1).max() <= 1.0 + 1e-5


def test_deterministic_and_restores_state(tiny, batch):
    x, y = batch
    tiny.train()
    flags = [p.requires_grad for p in tiny.parameters()]
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    spec = parse_attack("pgd:eps=0.2,steps=3")
    a = run_attack(tiny, spec, x, y, input_range=RANGE, num_classes=10, seed=7)
    assert np.random.rand() == expected_next  # the caller's numpy stream is untouched
    assert tiny.training and [p.requires_grad for p in tiny.parameters()] == flags
    tiny.eval()
    b = run_attack(tiny, spec, x, y, input_range=RANGE, num_classes=10, seed=7)
    c = run_attack(tiny, spec, x, y, input_range=RANGE, num_classes=10, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # the random start depends on the seed


def test_other_input_range(tiny, batch):
    x, y = batch
    shifted = x * 2 - 1  # the model sees a different range: the attack must still respect [-1, 1]
    x_adv = run_attack(tiny, parse_attack("fgsm:eps=0.5"), shifted, y, input_range=(-1.0, 1.0), num_classes=10)
    assert x_adv.min() >= -1 and x_adv.max() <= 1 and x_adv.min() < 0


def test_bad_inputs_are_one_line_errors(tiny, batch):
    x, y = batch
    spec = parse_attack("fgsm")
    with pytest.raises(HardenError, match="outside the input range"):
        run_attack(tiny, spec, x * 255, y, input_range=RANGE, num_classes=10)
    with pytest.raises(HardenError, match="labels"):
        run_attack(tiny, spec, x, y[:-1], input_range=RANGE, num_classes=10)
    with pytest.raises(HardenError, match="outside 0..9"):
        run_attack(tiny, spec, x, y + 10, input_range=RANGE, num_classes=10)
    with pytest.raises(HardenError, match="has no option"):
        run_attack(tiny, AttackSpec("fgsm", {"steps": 3}), x, y, input_range=RANGE, num_classes=10)
    with pytest.raises(HardenError, match="unknown attack"):
        run_attack(tiny, AttackSpec("nope", {}), x, y, input_range=RANGE, num_classes=10)


def test_empty_batch(tiny, batch):
    x, y = batch
    out = run_attack(tiny, parse_attack("pgd"), x[:0], y[:0], input_range=RANGE, num_classes=10)
    assert out.shape == x[:0].shape and out.dtype == np.float32


def test_black_box_attack_queries_target_model(tiny, batch):
    x, y = batch
    calls = []

    def oracle(batch_x):
        calls.append(len(batch_x))
        with torch.no_grad():
            return {"logits": tiny(torch.from_numpy(batch_x)).numpy()}

    spec = parse_attack(QUICK["hopskipjump"])
    x_adv = run_attack(tiny, spec, x[:4], y[:4], input_range=RANGE, num_classes=10, target_model=oracle)
    assert calls and x_adv.shape == x[:4].shape


def test_fast_class_gradient_matches_art(tiny, batch):
    from art.estimators.classification import PyTorchClassifier

    from harden.attacks.catalog import _torch_estimator

    x, _ = batch
    labels = np.random.default_rng(0).integers(0, 10, len(x))
    for model in (tiny, torch.fx.symbolic_trace(tiny)):  # harden hands over fx graphs
        fast = _torch_estimator(model, x.shape[1:], 10, RANGE)
        art = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=x.shape[1:], nb_classes=10,
                                clip_values=RANGE, device_type="cpu")
        for label in (labels, None, 3):
            np.testing.assert_allclose(fast.class_gradient(x, label=label), art.class_gradient(x, label=label),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["noise", "blur", "saltpepper"])
def test_degradation_is_the_weakest_level_that_flips(kind, tiny, batch):
    """Through the attack registry a degradation is seeded and equals degrade() with the same seed stream."""
    from harden.attacks.degradations import degrade

    x, y = batch
    a = run_attack(tiny, parse_attack(kind), x, y, input_range=RANGE, num_classes=10, seed=3)
    b = run_attack(tiny, parse_attack(kind), x, y, input_range=RANGE, num_classes=10, seed=3)
    np.testing.assert_array_equal(a, b)
    np.random.seed(3)
    expected, flipped = degrade(tiny, kind, x, y, seed=int(np.random.randint(2**31)), input_range=RANGE)
    np.testing.assert_array_equal(a, expected)
    assert flipped.mean() >= 0.5, f"{kind} flipped only {flipped.mean():.0%} of the digits"
    with torch.no_grad():
        pred = tiny(torch.from_numpy(a)).argmax(1).numpy()
    assert (pred[flipped] != y[flipped]).all()


def test_degradation_queries_the_target_model(tiny, batch):
    """Against a target that always answers class 0, digits labelled 0 can never flip: they keep the strongest
    level, and every other digit flips at the weakest level already."""
    x, y = batch
    calls = []

    def always_zero(batch_x):
        calls.append(len(batch_x))
        out = np.zeros((len(batch_x), 10), np.float32)
        out[:, 0] = 1
        return out

    out = run_attack(tiny, parse_attack("noise"), x, y, input_range=RANGE, num_classes=10, seed=0,
                     target_model=always_zero)
    assert calls, "the target model was never queried"
    moved = np.abs(out - x).reshape(len(x), -1).max(1)
    weakest = moved[y != 0]
    assert (y == 0).any() and (y != 0).any()
    assert moved[y == 0].min() > weakest.max()
