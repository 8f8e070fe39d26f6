"""eps=auto: resolve_auto_eps on a toy model whose half-accuracy eps is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import harden.attacks.strength as strength_module
from harden.attacks.strength import AUTO_MAX_INPUTS, EPS_GRID, auto_eps_facts, resolve_auto_eps
from harden.attacks.catalog import parse_attack


class Threshold(nn.Module):
    """Two classes split at the middle of the input range: logits (-(x - mid), x - mid) * 10 of the first value."""

    def __init__(self, mid: float):
        super().__init__()
        self.mid = mid

    def forward(self, x):
        d = (x.flatten(1)[:, :1] - self.mid) * 10.0
        return torch.cat([-d, d], dim=1)


def margin_data(margins: list[float], lo: float = 0.0, hi: float = 1.0, per: int = 10):
    """Per margin m (a fraction of the range width): ``per`` inputs of each class at mid -/+ m * width.

    FGSM moves each input by eps towards the other side, so it flips exactly the inputs whose margin is < eps.
    """
    mid, width = (lo + hi) / 2, hi - lo
    x, y = [], []
    for m in margins:
        x += [mid - m * width] * per + [mid + m * width] * per
        y += [0] * per + [1] * per
    return np.array(x, dtype=np.float32)[:, None], np.array(y, dtype=np.int64)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.0, 2.0)])
def test_auto_eps_is_the_first_grid_value_that_flips_half(lo, hi):
    # Half the inputs at margin 0.04 of the width, half at 0.12: FGSM accuracy is 1 below eps 0.04, 1/2 from 0.04
    # to 0.12. The first grid fraction past 0.04 is 0.05: accuracy exactly half, so the search stops there.
    x, y = margin_data([0.04, 0.12], lo, hi)
    width = hi - lo
    texts = ["pgd:eps=auto", "fgsm:EPS=Auto,norm=inf", "saltpepper", "bim:eps=0.2,steps=3", "pgd:steps=5,eps=auto"]
    resolved, strength = resolve_auto_eps(texts, Threshold((lo + hi) / 2), x, y, input_range=(lo, hi), num_classes=2)
    assert strength.eps == pytest.approx(0.05 * width)
    assert strength.clean_accuracy == 1.0
    fractions = [round(e / width, 6) for e in strength.accuracy]
    assert fractions == [f for f in EPS_GRID if f <= 0.05]   # the search stopped at the first eps at half
    assert strength.accuracy[strength.eps] == 0.5
    number = f"{0.05 * width:g}"
    assert resolved == [f"pgd:eps={number}", f"fgsm:EPS={number},norm=inf", "saltpepper", "bim:eps=0.2,steps=3",
                        f"pgd:steps=5,eps={number}"]
    assert resolved[3] is texts[3] and resolved[2] is texts[2]   # texts without eps=auto untouched
    assert parse_attack(resolved[0]).params["eps"] == pytest.approx(0.05 * width)
    facts = auto_eps_facts(strength, len(x))
    assert facts["eps"] == strength.eps and facts["split"] == "train" and facts["inputs"] == len(x)


def test_no_auto_computes_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("half_accuracy_eps must not run without eps=auto")

    monkeypatch.setattr(strength_module, "half_accuracy_eps", boom)
    texts = ["pgd:eps=0.1", "saltpepper", "deepfool", "fgsm:eps=0.03,norm=2"]
    resolved, strength = resolve_auto_eps(texts, None, np.zeros((0, 1)), np.zeros(0), input_range=(0.0, 1.0),
                                          num_classes=2)
    assert resolved == texts and strength is None
    assert auto_eps_facts(None, 10) is None


def test_uses_only_the_inputs_given():
    # One model, two data sets, two answers: margins 0.14, 0.14, 0.2 -> FGSM accuracy 1 up to eps 0.1, 1/3 at 0.15
    # (closest to half: 0.15); margins 0.025, 0.3 -> accuracy 1 up to 0.02, 1/2 at 0.03.
    model = Threshold(0.5)
    x_far, y_far = margin_data([0.14, 0.14, 0.2])
    _, far = resolve_auto_eps(["fgsm:eps=auto"], model, x_far, y_far, input_range=(0.0, 1.0), num_classes=2)
    assert far.eps == pytest.approx(0.15)
    x_near, y_near = margin_data([0.025, 0.3])
    _, near = resolve_auto_eps(["fgsm:eps=auto"], model, x_near, y_near, input_range=(0.0, 1.0), num_classes=2)
    assert near.eps == pytest.approx(0.03)


def test_at_most_max_inputs_of_those_given_seeded(monkeypatch):
    seen = []
    real = strength_module.half_accuracy_eps

    def spy(model, x, y, **kwargs):
        seen.append((x.copy(), y.copy()))
        return real(model, x, y, **kwargs)

    monkeypatch.setattr(strength_module, "half_accuracy_eps", spy)
    x, y = margin_data([0.04, 0.12], per=300)              # 1200 inputs
    x = x + np.arange(len(x), dtype=np.float32)[:, None] * 1e-6   # each row distinct, to tell which were used
    model = Threshold(0.5)
    for seed in (0, 0, 1):
        resolve_auto_eps(["pgd:eps=auto"], model, torch.from_numpy(x), torch.from_numpy(y), input_range=(0.0, 1.0),
                         num_classes=2, seed=seed)
    assert [len(s[0]) for s in seen] == [AUTO_MAX_INPUTS] * 3
    given = {float(v) for v in x[:, 0]}
    assert all(float(v) in given for v in seen[0][0][:, 0])         # rows of the given inputs, nothing else
    assert np.array_equal(seen[0][0], seen[1][0])                   # seeded: the same subset again
    assert not np.array_equal(seen[0][0], seen[2][0])               # another seed, another subset
    small_x, small_y = margin_data([0.04, 0.12])
    resolve_auto_eps(["pgd:eps=auto"], model, small_x, small_y, input_range=(0.0, 1.0), num_classes=2)
    assert np.array_equal(seen[-1][0], small_x)                     # fewer than the cap: all of them, in order
