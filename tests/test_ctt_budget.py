"""CTT fine-tuning budget (steps, convergence, the --epochs override) and --eps auto (harden.train.eps_search)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from harden.methods.base import FitContext, MethodSpec, Options
from harden.train.finetune import FinetuneConfig, finetune_ctt

TRAIN = 320   # 5 batches of 64 an epoch


@pytest.fixture(scope="module")
def setup(tiny_model, digits):
    from harden.graph.trace import trace
    from harden.methods.ctt import CTTStrict

    gm = trace(tiny_model)
    sites, masks, _ = CTTStrict().plan(FitContext(gm=gm, data=digits, options=Options(key="budget"),
                                                  settings=MethodSpec.of("ctt-strict", mask_ratio=0.05).settings))
    return sites, masks


def _run(tiny_model, digits, setup, **cfg):
    import copy

    from harden.graph.trace import trace

    sites, masks = setup
    gm = copy.deepcopy(trace(tiny_model))
    train = (digits.train.x[:TRAIN], digits.train.y[:TRAIN])
    calibration = (digits.calibration.x[:100], digits.calibration.y[:100])
    history, best, _, _ = finetune_ctt(gm, sites, masks, train, calibration, digits.input_range,
                                       FinetuneConfig(kind="strict", eps=0.01, **cfg))
    return history, best


def test_training_stops_at_the_step_budget_with_a_check_every_n_steps(tiny_model, digits, setup, one_thread):
    history, best = _run(tiny_model, digits, setup, steps=7, check_every=3, patience=0, lr=1e-3)
    assert [r.step for r in history] == [3, 6, 7]          # a check every 3 steps and one at the budget
    assert [r.epoch for r in history] == [1, 2, 3]
    assert [r.stop for r in history] == ["", "", "step budget"]
    assert 1 <= best <= 3


def test_training_stops_once_the_calibration_l_c_plateaus(tiny_model, digits, setup, one_thread):
    # lr so small the weights cannot move: L_C never improves by 1%, so training stops after `patience` checks
    history, _ = _run(tiny_model, digits, setup, steps=200, check_every=2, patience=3, lr=1e-12)
    assert [r.step for r in history] == [2, 4, 6]
    assert history[-1].stop == "converged"
    assert history[0].cal_l_c > 0
    # the same run without the convergence rule trains the whole budget
    history, _ = _run(tiny_model, digits, setup, steps=10, check_every=2, patience=0, lr=1e-12)
    assert history[-1].step == 10 and history[-1].stop == "step budget"


def test_an_improving_l_c_keeps_training(tiny_model, digits, setup, one_thread):
    # a real learning rate and the fixed thresholds: L_C falls by over 1% a check here, so patience never runs out
    history, _ = _run(tiny_model, digits, setup, steps=12, check_every=3, patience=1, lr=1e-3, trap_rule="fixed")
    assert history[-1].step == 12 and history[-1].stop == "step budget"
    assert history[-1].cal_l_c < 0.99 * history[0].cal_l_c


def test_epochs_override_trains_exactly_that_many_epochs_without_early_stop(tiny_model, digits, setup, one_thread):
    history, _ = _run(tiny_model, digits, setup, epochs=2, lr=1e-12, patience=1)
    assert [r.step for r in history] == [5, 10]            # whole epochs of 5 batches, a check at each end
    assert [r.epoch for r in history] == [1, 2]
    assert history[-1].stop == "epochs"


def test_budget_defaults_and_checks():
    from harden.errors import HardenError
    from harden.train.finetune import DEFAULT_STEPS, default_check_every

    cfg = FinetuneConfig(kind="loose")
    assert cfg.steps == DEFAULT_STEPS and cfg.epochs is None and cfg.patience == 3
    assert FinetuneConfig(kind="loose", epochs=2).steps is None
    assert [default_check_every(n) for n in (3, 14, 47, 900)] == [10, 14, 47, 50]
    with pytest.raises(HardenError, match="--epochs or --steps"):
        FinetuneConfig(kind="loose", epochs=2, steps=100).check()
    with pytest.raises(HardenError, match="--patience"):
        FinetuneConfig(kind="loose", patience=-1).check()


# ------------------------------------------------------------------------------------------------- --eps auto


def _candidate(eps, accuracy, detection):
    from harden.train.eps_search import Candidate

    return Candidate(eps=eps, accuracy=accuracy, detection=detection, adversarial=50, alarm_fpr=0.02, steps=1,
                     stop="step budget", seconds=0.0)


def test_choose_takes_the_best_detection_among_accurate_candidates_ties_to_the_larger_eps():
    from harden.train.eps_search import choose

    base = 0.95
    grid = [_candidate(1e-4, 0.95, 0.20), _candidate(3e-4, 0.95, 0.60), _candidate(1e-3, 0.945, 0.80),
            _candidate(3e-3, 0.95, 0.80), _candidate(1e-2, 0.90, 0.99), _candidate(3e-2, 0.80, 0.10)]
    # 1e-2 detects most but costs 5 points of accuracy; 1e-3 and 3e-3 tie, the larger box wins
    assert choose(grid, base, 0.01).eps == 3e-3
    assert choose(grid, base, 0.10).eps == 1e-2              # a looser accuracy rule admits it
    # nobody accurate enough: the most accurate
    assert choose([_candidate(1e-4, 0.5, 0.9), _candidate(1e-3, 0.7, 0.1), _candidate(1e-2, 0.6, 0.5)],
                  base, 0.01).eps == 1e-3


class _Rescaled(torch.nn.Module):
    """The tiny model for inputs in [-1, 1]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x + 1) / 2)


def test_eps_auto_picks_the_known_best_eps(tiny_model, digits, setup, monkeypatch, one_thread):
    """The search's own plumbing (halves, attack strength, grid in input units, choice) with each candidate's
    training replaced by a known score: the best qualifying eps is the middle of the grid."""
    import harden.train.eps_search as es
    from harden.graph.trace import trace

    known = {1e-4: (0.96, 0.10), 3e-4: (0.96, 0.40), 1e-3: (0.96, 0.85), 3e-3: (0.96, 0.50),
             1e-2: (0.50, 1.00), 3e-2: (0.40, 1.00)}   # by fraction of the range: (accuracy, detection)
    width = 2.0
    seen = []

    def fake(eps, gm, sites, masks, train, calibration, halves, attack_eps, input_range, num_classes, cfg,
             make_method, progress):
        seen.append((eps, attack_eps, len(halves[0][0]), len(halves[1][0]), cfg.steps))
        accuracy, detection = known[round(eps / width, 10)]
        return _candidate(eps, accuracy, detection)

    monkeypatch.setattr(es, "_candidate", fake)
    sites, masks = setup
    gm = trace(tiny_model)
    x, y = digits.calibration.x[:120] * 2 - 1, digits.calibration.y[:120]     # a [-1, 1] model input range
    net = _Rescaled(gm)
    search = es.search_eps(net, sites, masks, (digits.train.x, digits.train.y), (x, y), (-1.0, 1.0),
                           digits.num_classes, FinetuneConfig(kind="strict", steps=40), lambda t, s: None)
    assert search.eps == pytest.approx(1e-3 * width)
    assert [e for e, *_ in seen] == pytest.approx([f * width for f in es.EPS_FRACTIONS])
    assert all(a == search.attack_eps > 0 and n_a == 60 and n_b == 60 and steps == 10 for _, a, n_a, n_b, steps in seen)
    assert [c["eps"] for c in search.to_json()["candidates"]] == pytest.approx([f * width for f in es.EPS_FRACTIONS])


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_eps_auto_writes_the_chosen_float_eps(tiny_model, tmp_path, one_thread):
    from harden.cli.app import app
    from harden.train.eps_search import EPS_FRACTIONS

    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    out = tmp_path / "auto.hardened"
    result = CliRunner().invoke(app, [str(a) for a in (
        "instrument", state, "--arch", "conftest:TinyCNN", "--data", "digits", "--limit", 600, "--method",
        "ctt-strict:eps=auto,steps=8,mask_ratio=0.05", "--key", "k", "-o", out, "--json")],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)["manifest"]
    assert isinstance(manifest["eps"], float) and manifest["eps"] in EPS_FRACTIONS   # input range [0, 1]
    config = manifest["methods"][0]["config"]
    assert config["eps"] == manifest["eps"] == config["finetune"]["eps"] == config["eps_search"]["eps"]
    candidates = config["eps_search"]["candidates"]
    assert [c["eps"] for c in candidates] == list(EPS_FRACTIONS)
    assert all(c["steps"] <= 2 and 0.0 <= c["detection"] <= 1.0 for c in candidates)
    assert config["finetune"]["steps_taken"] <= 8 and config["finetune"]["stop_reason"] in ("converged", "step budget")
    # the certify default reads the manifest's eps as a number
    from harden.bundle.archive import load_bundle

    assert float(load_bundle(out)[1]["eps"]) == manifest["eps"]


@pytest.mark.parametrize("args, message", [(("--method", "ctt-strict:eps=big"), "eps='big' is not a number, auto, scaled"),
                                           (("--method", "ctt-lite:eps=auto"), "method 'ctt-lite' has no option 'eps'")])
def test_cli_eps_errors(tiny_model, tmp_path, args, message):
    from harden.cli.app import app

    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    result = CliRunner().invoke(app, ["instrument", str(state), "--arch", "conftest:TinyCNN", "--data", "digits",
                                      *args, "--key", "k", "-o", str(tmp_path / "x.hardened")])
    assert result.exit_code != 0 and message in result.output, result.output


def test_the_original_weights_are_kept_when_no_check_stays_accurate(tiny_model, digits, setup, one_thread):
    import copy

    from harden.graph.trace import trace

    sites, masks = setup
    gm = copy.deepcopy(trace(tiny_model))
    before = copy.deepcopy(gm.state_dict())
    train = (digits.train.x[:TRAIN], digits.train.y[:TRAIN])
    calibration = (digits.calibration.x[:100], digits.calibration.y[:100])
    # a learning rate that wrecks the classifier at the first step: no check is within 1 point of the original
    history, best, _, _ = finetune_ctt(gm, sites, masks, train, calibration, digits.input_range,
                                       FinetuneConfig(kind="strict", eps=0.01, steps=6, check_every=3, patience=0,
                                                      lr=10.0, alpha=1e3))
    with torch.no_grad():
        original = (tiny_model(calibration[0]).argmax(1) == calibration[1]).float().mean().item()
    assert max(r.accuracy for r in history) < original - 0.01   # the premise: every check lost accuracy
    assert best == 0
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
