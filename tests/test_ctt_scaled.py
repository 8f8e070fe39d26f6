"""CTT traps with per-trap scales (FinetuneConfig.trap_scale="std"): the head, the exported scales, the bundle."""

import numpy as np
import pytest
import torch

from harden.instrumentation.pipeline import instrument
from harden.methods.base import Options
from harden.methods.ctt import TrapHead


def test_scaled_head_divides_each_excess_by_its_scale():
    head = TrapHead([4], [2], scaled=True)
    head.indices_0.copy_(torch.tensor([1, 3]))
    head.thresholds_0.copy_(torch.tensor([0.5, 1.0]))
    head.scales_0.copy_(torch.tensor([0.1, 2.0]))
    act = torch.tensor([[9.0, 0.6, 9.0, 2.0], [0.0, 0.4, 0.0, 1.0]])
    # trap 0: (0.6 - 0.5) / 0.1 = 1.0, trap 1: (2.0 - 1.0) / 2 = 0.5; second row: -1.0 and 0.0
    assert head(act).tolist() == pytest.approx([1.0, 0.0])
    assert head.alarm_thresholds(0, 0.25).tolist() == pytest.approx([0.525, 1.5])


def test_unscaled_head_is_unchanged_and_shifts_every_trap_alike():
    head = TrapHead([4], [2])
    head.indices_0.copy_(torch.tensor([1, 3]))
    head.thresholds_0.copy_(torch.tensor([0.5, 1.0]))
    assert not hasattr(head, "scales_0")
    assert head(torch.tensor([[0.0, 0.6, 0.0, 2.0]])).tolist() == pytest.approx([1.0])
    assert head.alarm_thresholds(0, 0.25).tolist() == pytest.approx([0.75, 1.25])


@pytest.fixture(scope="module")
def scaled(tiny_model, digits):
    method = "ctt-strict:mask_ratio=0.05,eps=0.01,epochs=2,lr=1e-3,alpha=0.5,trap_scale=std"
    return instrument(tiny_model, digits, [method], Options(key="sc"))


def test_exported_scales_are_the_natural_spread_of_each_trap(scaled, digits):
    from harden.graph.analyse import feature_extractor
    from harden.train.finetune import pre_activation

    method = scaled.methods[0]
    assert method.config["trap_scaled"] is True and method.head.scaled
    gm = scaled.classifier
    pres = [pre_activation(gm, s) for s in method.sites]
    _, *acts = feature_extractor(gm, pres)(digits.train.x)
    floor = 0.01
    for i, act in enumerate(acts):
        indices, _ = method.head.trap(i)
        expected = act.flatten(1).index_select(1, indices).std(dim=0).clamp_min(floor)
        assert torch.allclose(method.head.scales(i), expected, rtol=1e-5)
    assert any(bool((method.head.scales(i) > floor).any()) for i in range(len(acts)))


def test_scaled_score_is_the_largest_scaled_excess_and_survives_the_bundle(scaled, digits, tmp_path):
    from harden.graph.analyse import feature_extractor
    from harden.bundle.archive import load_bundle, save_bundle

    method = scaled.methods[0]
    _, *acts = feature_extractor(scaled.classifier, method.sites)(digits.test.x)
    by_hand = torch.stack([
        ((a.flatten(1).index_select(1, method.head.trap(i)[0]) - method.head.trap(i)[1]) / method.head.scales(i))
        .amax(dim=1) for i, a in enumerate(acts)], dim=1).amax(dim=1)
    raw = scaled.torch_outputs(digits.test.x)[method.feature_output]
    assert np.allclose(raw.reshape(-1), by_hand.numpy(), rtol=1e-5, atol=1e-6)
    out = scaled.run(digits.test.x)
    save_bundle(scaled, tmp_path / "s.hardened")
    loaded, _ = load_bundle(tmp_path / "s.hardened")
    again = loaded.run(digits.test.x)
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_quiet_placement_draws_traps_among_constant_positions(tiny_model, digits):
    from harden.graph.analyse import feature_extractor
    from harden.methods.ctt import QUIET_STD, make_masks
    from harden.train.finetune import pre_activation

    import dataclasses

    # blank the two left columns of every digit: the conv windows there see a constant input
    def blank(split):
        x = split.x.clone()
        x[..., :, :2] = 0.0
        return dataclasses.replace(split, x=x)

    digits = dataclasses.replace(digits, train=blank(digits.train), calibration=blank(digits.calibration),
                                 test=blank(digits.test))
    hardened = instrument(tiny_model, digits, ["ctt-lite:mask_ratio=0.05,trap_placement=quiet"], Options(key="q"))
    method = hardened.methods[0]
    assert method.config["trap_placement"] == "quiet"
    gm = hardened.classifier
    _, *pre = feature_extractor(gm, [pre_activation(gm, s) for s in method.sites])(digits.train.x)
    uniform = make_masks("q", dict(zip(method.sites, method.config["sizes"])), 0.05,
                         dict(zip(method.sites, method.config["site_keys"])))
    quiet_sites = 0
    for i, (site, a) in enumerate(zip(method.sites, pre)):
        std = a.flatten(1).std(dim=0)
        eligible = int((std < QUIET_STD).sum())
        indices, _ = method.head.trap(i)
        assert len(indices) == len(uniform[site]) and len(set(indices.tolist())) == len(indices)
        quiet = std[indices] < QUIET_STD
        assert int(quiet.sum()) >= min(len(indices), eligible)   # every trap it could place is quiet
        if eligible == 0:
            assert torch.equal(indices, uniform[site])           # nothing quiet: the key's uniform choice
        quiet_sites += eligible > 0
    assert quiet_sites > 0  # the blanked columns give constant windows, so the rule did something


def test_certify_sees_the_traps_the_exported_alarm_uses(scaled, digits):
    # harden certify bounds the alarm through ctt_traps: with a scaled head each trap's threshold moves by its
    # own shift x scale, and an input alarms exactly when some trap's activation exceeds its threshold.
    from harden.api import ctt_traps
    from harden.bounds import run_recorded

    traps = ctt_traps(scaled)
    x = torch.cat([digits.test.x, digits.test.x + 0.3 * torch.randn_like(digits.test.x)]).clamp(0, 1)
    _, values = run_recorded(scaled.classifier, x, {t.node for t in traps})
    fired = torch.zeros(len(x), dtype=torch.bool)
    for trap in traps:
        fired |= (values[trap.node].flatten(1).index_select(1, trap.flat_indices) > trap.thresholds).any(dim=1)
    alarm = torch.as_tensor(scaled.run(x.numpy())["ctt-strict.alarm"]).bool()
    assert torch.equal(fired, alarm)
    assert 0 < int(alarm.sum()) < len(x)   # both outcomes occur
    assert any(not torch.allclose(t.thresholds - t.thresholds.min(), torch.zeros_like(t.thresholds)) for t in traps)
