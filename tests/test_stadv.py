"""stAdv (thesis 2.3 / 4.2): it lowers the target margin on a toy model, stays inside its budget, and runs from the catalog."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from harden.attacks.catalog import ATTACKS, parse_attack, run_attack
from harden.attacks.stadv import StAdvSettings, margin_loss, stadv
from harden.core.flow import total_variation, warp
from harden.errors import HardenError

from conftest import train_tiny


@pytest.fixture(scope="module")
def toy(digits, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = train_tiny(model, digits.train.x, digits.train.y, epochs=15)
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = digits.test.x[:40], digits.test.y[:40]
    targets = (y + 1 + torch.arange(40) % 9) % 10
    return model, x, y, targets


@pytest.mark.parametrize("budget,delta", [(0.0, 0.0), (20.0, 0.0), (0.0, 0.5), (20.0, 0.5)])
def test_stadv_lowers_the_target_margin_inside_its_budget(toy, budget, delta):
    model, x, _, targets = toy
    settings = StAdvSettings(budget=budget, delta=delta, targeted=True, steps=40, search_steps=2, lr=0.05)
    result = stadv(model, x, targets, settings)
    with torch.no_grad():
        before = margin_loss(model(x), targets, True, 0.0)
        after = margin_loss(model(result.x_adv), targets, True, 0.0)
    assert float(after.mean()) < float(before.mean()) - 0.5
    assert int(result.success.sum()) > 0
    assert torch.allclose(result.x_adv, warp(x, result.flow), atol=1e-6)
    if delta:
        assert float(result.flow.abs().max()) <= delta + 1e-6
    if budget:
        assert bool((total_variation(result.flow) <= budget + 1e-4).all())
    reached = model(result.x_adv).argmax(1) == targets
    assert torch.equal(reached, result.success)


def test_untargeted_stadv_moves_inputs_off_their_label(toy):
    model, x, y, _ = toy
    result = stadv(model, x, y, StAdvSettings(budget=0.0, delta=0.5, steps=40, search_steps=2, lr=0.05))
    with torch.no_grad():
        wrong = model(result.x_adv).argmax(1) != y
    assert torch.equal(wrong, result.success) and float(wrong.float().mean()) > 0.3


def test_stadv_from_the_catalog(toy):
    model, x, y, _ = toy
    assert ATTACKS.get("stadv").is_targeted(parse_attack("stadv:targeted=true").resolved())
    assert not ATTACKS.get("stadv").is_targeted(parse_attack("stadv").resolved())
    spec = parse_attack("stadv:delta=0.5,budget=0,steps=30,search_steps=1,lr=0.05")
    x_np, y_np = x.numpy(), y.numpy()
    adv = run_attack(model, spec, x_np, y_np, input_range=(0.0, 1.0), num_classes=10)
    assert adv.shape == x_np.shape and adv.dtype == np.float32
    assert 0.0 <= adv.min() and adv.max() <= 1.0
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(adv)).argmax(1).numpy() == y_np).mean()
        clean = (model(x).argmax(1).numpy() == y_np).mean()
    assert accuracy < clean - 0.2
    again = run_attack(model, spec, x_np, y_np, input_range=(0.0, 1.0), num_classes=10)
    assert np.array_equal(adv, again)


def test_stadv_parameters_are_checked():
    for bad in ("stadv:tau=2000", "stadv:budget=-1", "stadv:targeted=maybe", "stadv:steps=0", "stadv:lr=0"):
        with pytest.raises(HardenError):
            parse_attack(bad)
    with pytest.raises(HardenError):
        stadv(nn.Identity(), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), StAdvSettings())
