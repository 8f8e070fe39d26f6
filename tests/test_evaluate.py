"""evaluate(): metrics checked against scorers whose alarms are known, so a wrong metric fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import digits_arrays, train_tiny
from harden.attacks.catalog import parse_attack, run_attack
from harden.errors import HardenError
from harden.evaluation.evaluate import AttackRow, EvaluationReport, evaluate, render_table, roc_auc

RANGE = (0.0, 1.0)
N = 40


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def setup():
    x, y = digits_arrays()
    torch.manual_seed(0)
    model = train_tiny(Tiny(), torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000]), epochs=5, lr=1e-2)
    return model, x[1000 : 1000 + N], y[1000 : 1000 + N]


def logits_of(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def novelty_scorer(model, clean):
    """alarm = the input is none of the clean inputs; score = L-inf distance to the nearest clean input."""
    flat = clean.reshape(len(clean), -1)
    known = {row.tobytes() for row in flat}

    def scorer(x):
        rows = x.reshape(len(x), -1)
        alarm = np.array([row.tobytes() not in known for row in rows])
        dist = np.abs(rows[:, None, :] - flat[None]).max(axis=2).min(axis=1).astype(np.float32)
        return {"logits": logits_of(model, x), "alarm": alarm, "score": dist,
                "novel.alarm": alarm, "novel.score": dist,
                "never.alarm": np.zeros(len(x), bool), "never.score": np.zeros(len(x), np.float32)}

    return scorer


def never_scorer(model):
    def scorer(x):
        return {"logits": logits_of(model, x), "alarm": np.zeros(len(x), bool), "score": np.zeros(len(x), np.float32)}

    return scorer


FGSM = parse_attack("fgsm:eps=0.2")
PGD = parse_attack("pgd:eps=0.2,steps=3")


def run(model, scorer, x, y, attacks=(FGSM,), **kw):
    return evaluate(model, scorer, x, y, list(attacks), input_range=RANGE, num_classes=10, seed=0, **kw)


def test_known_alarm_gives_full_detection_and_no_false_positives(setup):
    model, x, y = setup
    report = run(model, novelty_scorer(model, x), x, y, attacks=(FGSM, PGD))
    assert report.n_clean == N
    assert report.clean_fpr == 0.0
    assert report.per_method_fpr == {"never": 0.0, "novel": 0.0}
    assert [r.attack for r in report.rows] == ["fgsm:eps=0.2", "pgd:eps=0.2,steps=3"]
    for row in report.rows:
        assert row.n == N
        assert row.detection_rate == 1.0
        assert row.per_method_detection == {"never": 0.0, "novel": 1.0}
        assert row.roc_auc["score"] == 1.0 and row.roc_auc["novel.score"] == 1.0
        assert row.roc_auc["never.score"] == 0.5  # a constant score cannot separate anything
        assert row.seconds > 0
        assert row.params["eps"] == 0.2


def test_never_alarm_gives_zero_detection(setup):
    model, x, y = setup
    report = run(model, never_scorer(model), x, y)
    row = report.rows[0]
    assert report.clean_fpr == 0.0 and report.per_method_fpr == {}
    assert row.detection_rate == 0.0
    assert row.detection_rate_successful == 0.0
    assert row.roc_auc == {"score": 0.5}
    assert row.per_method_detection == {}


def test_accuracy_norms_and_denominators_match_an_independent_computation(setup):
    model, x, y = setup
    # alarm = the predicted class is odd: every metric is recomputed here from the same (seeded) attack.
    def wrong_scorer(batch):
        logits = logits_of(model, batch)
        pred = logits.argmax(1)
        return {"logits": logits, "alarm": pred % 2 == 1, "score": pred.astype(np.float32)}

    report = run(model, wrong_scorer, x, y)
    row = report.rows[0]

    x_adv = run_attack(model, FGSM, x, y, input_range=RANGE, num_classes=10, seed=0)
    clean_pred = logits_of(model, x).argmax(1)
    adv_pred = logits_of(model, x_adv).argmax(1)
    correct = clean_pred == y
    successful = correct & (adv_pred != y)
    delta = (x_adv - x).reshape(N, -1)

    assert report.clean_accuracy == pytest.approx(np.mean(correct))
    assert report.clean_fpr == pytest.approx(np.mean(clean_pred % 2 == 1))
    assert row.accuracy == pytest.approx(np.mean(adv_pred == y))
    assert row.accuracy < report.clean_accuracy
    assert row.n_correct == correct.sum() and row.n_successful == successful.sum() > 0
    assert row.detection_rate == pytest.approx(np.mean(adv_pred[correct] % 2 == 1))
    assert row.detection_rate_successful == pytest.approx(np.mean(adv_pred[successful] % 2 == 1))
    assert row.mean_l2 == pytest.approx(np.linalg.norm(delta[correct], axis=1).mean(), rel=1e-5)
    assert row.mean_linf == pytest.approx(0.2, abs=1e-6)


def test_detection_counts_only_originally_correct_inputs(setup):
    model, x, y = setup
    # labels made wrong for the first half: those inputs are not originally correct, so alarms there must not count.
    y_bad = y.copy()
    y_bad[: N // 2] = (logits_of(model, x[: N // 2]).argmax(1) + 1) % 10
    clean_keys = {row.tobytes() for row in x.reshape(N, -1)}

    def scorer(batch):
        # alarm on adversarial versions of the first half only (found by their nearest clean input)
        flat = batch.reshape(len(batch), -1)
        nearest = np.abs(flat[:, None, :] - x.reshape(N, -1)[None]).max(axis=2).argmin(axis=1)
        is_clean = np.array([r.tobytes() in clean_keys for r in flat])
        alarm = (nearest < N // 2) & ~is_clean
        return {"logits": logits_of(model, batch), "alarm": alarm, "score": alarm.astype(np.float32)}

    report = run(model, scorer, x, y_bad)
    row = report.rows[0]
    assert report.clean_fpr == 0.0
    assert report.clean_accuracy <= 0.5
    assert row.detection_rate == 0.0  # every alarm fell on an input that was not originally correct
    assert row.n_correct <= N // 2


def test_empty_sets_are_none_and_json_is_strict(setup):
    model, x, _ = setup
    wrong = (logits_of(model, x).argmax(1) + 1) % 10  # nothing is originally correct
    report = run(model, never_scorer(model), x, wrong)
    row = report.rows[0]
    assert report.clean_accuracy == 0.0
    assert row.detection_rate is None and row.detection_rate_successful is None
    assert row.mean_l2 is None and row.mean_linf is None
    assert row.roc_auc == {"score": None}
    json.dumps(report.to_dict(), allow_nan=False)


def test_json_round_trip(setup):
    model, x, y = setup
    report = run(model, novelty_scorer(model, x), x, y)
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False, sort_keys=True)
    back = json.loads(text)
    assert back == data
    again = EvaluationReport.from_dict(back)
    assert again == report
    assert isinstance(again.rows[0], AttackRow)
    assert set(back) == {"clean_accuracy", "clean_fpr", "per_method_fpr", "rows", "n_clean"}


def test_limit_progress_and_table(setup):
    from rich.console import Console

    model, x, y = setup
    messages = []
    report = run(model, novelty_scorer(model, x), x, y, attacks=(FGSM, PGD), limit=10,
                 progress=lambda m, f: messages.append((m, f)))
    assert report.n_clean == 10 and all(r.n == 10 for r in report.rows)
    assert any("fgsm:eps=0.2" in m for m, _ in messages) and any("pgd" in m for m, _ in messages)
    fractions = [f for _, f in messages]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(set(fractions)) == len(fractions)   # every step moves the bar

    table = render_table(report)
    assert [c.header for c in table.columns] == ["attack", "acc", "det", "det(succ)", "l2", "linf", "AUC", "s"]
    assert table.row_count == 3
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "no attack" in text and "fgsm:eps=0.2" in text and "pgd:eps=0.2,steps=3" in text
    assert "100.0%" in text  # detection of the novelty scorer


def test_roc_auc_is_nan_safe():
    assert roc_auc(np.zeros(0), np.ones(3)) is None
    assert roc_auc(np.zeros(3), np.zeros(0)) is None
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, np.inf])) == 1.0
    assert roc_auc(np.array([0.0, 0.1]), np.array([np.nan, 5.0])) == 1.0


def test_bad_scorer_and_inputs(setup):
    model, x, y = setup

    def no_alarm(batch):
        return {"logits": logits_of(model, batch), "score": np.zeros(len(batch))}

    with pytest.raises(HardenError, match="lack alarm"):
        run(model, no_alarm, x, y)

    def wrong_width(batch):
        return {"logits": logits_of(model, batch)[:, :5], "alarm": np.zeros(len(batch), bool),
                "score": np.zeros(len(batch))}

    with pytest.raises(HardenError, match="logits have shape"):
        run(model, wrong_width, x, y)
    with pytest.raises(HardenError, match="labels"):
        run(model, never_scorer(model), x, y[:-1])
    with pytest.raises(HardenError, match="limit"):
        run(model, never_scorer(model), x, y, limit=0)


def test_with_a_real_hardened_model(tiny_hardened, digits):
    """The project's own scorer contract: HardenedModel.run computes what the exported graph computes."""
    hardened = tiny_hardened
    x, y = digits.test.x.numpy()[:60], digits.test.y.numpy()[:60]
    report = evaluate(hardened.classifier, hardened.run, x, y, [parse_attack("fgsm:eps=0.2")], input_range=RANGE,
                      num_classes=10, seed=0)
    clean = hardened.run(x)
    row = report.rows[0]
    assert report.clean_fpr == pytest.approx(clean["alarm"].mean())
    assert report.clean_accuracy == pytest.approx((clean["logits"].argmax(1) == y).mean())
    assert set(report.per_method_fpr) == {"ctt-lite"}
    assert set(row.roc_auc) == {"score", "ctt-lite.score"}
    assert set(row.per_method_detection) == {"ctt-lite"}
    assert row.accuracy < report.clean_accuracy
    assert row.mean_linf == pytest.approx(0.2, abs=1e-6)
    json.dumps(report.to_dict(), allow_nan=False)


def _given(path, x, y, x_clean=None):
    from harden.io.adversarial import load_adversarial

    arrays = {"x": x, "y": y} if x_clean is None else {"x": x, "y": y, "x_clean": x_clean}
    np.savez(path, **arrays)
    return load_adversarial(path, input_shape=x.shape[1:], num_classes=10, input_range=RANGE)


def test_a_given_set_with_its_clean_inputs_scores_like_the_attack_that_made_it(setup, tmp_path):
    # The same adversarial examples, once crafted by harden and once read from a file: the rows must agree.
    model, x, y = setup
    scorer = novelty_scorer(model, x)
    weak = parse_attack("fgsm:eps=0.05")
    x_adv = run_attack(model, weak, x, y, input_range=RANGE, num_classes=10, seed=0)
    report = run(model, scorer, x, y, attacks=(weak,), given=[_given(tmp_path / "adv.npz", x_adv, y, x)])
    crafted, given = report.rows
    assert given.attack == "given:adv.npz"
    for name in ("n", "accuracy", "detection_rate", "detection_rate_successful", "mean_l2", "mean_linf",
                 "roc_auc", "per_method_detection", "n_correct", "n_successful"):
        assert getattr(given, name) == pytest.approx(getattr(crafted, name)), name
    assert 0 < crafted.n_successful < crafted.n_correct  # a case where the denominators differ


def test_a_given_set_without_clean_inputs_counts_every_input(setup, tmp_path):
    model, x, y = setup
    x_adv = run_attack(model, FGSM, x, y, input_range=RANGE, num_classes=10, seed=0)
    half = len(x) // 2
    mixed = np.concatenate([x[:half], x_adv[half:]])   # the scorer knows the first half: it does not alarm there
    report = run(model, novelty_scorer(model, x), x, y, attacks=(), given=[_given(tmp_path / "m.npz", mixed, y)])
    (row,) = report.rows
    assert row.n_correct == len(x) and row.mean_l2 is None and row.mean_linf is None
    changed = np.abs(mixed - x).reshape(len(x), -1).max(axis=1) > 0
    assert row.detection_rate == pytest.approx(changed.mean())
    wrong = logits_of(model, mixed).argmax(1) != y
    assert row.detection_rate_successful == pytest.approx(changed[wrong].mean())
    assert row.accuracy == pytest.approx(1 - wrong.mean())


def test_given_sets_are_checked(tmp_path):
    from harden.io.adversarial import load_adversarial

    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    y = np.arange(4)

    def load(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return load_adversarial(tmp_path / name, input_shape=(1, 8, 8), num_classes=10, input_range=RANGE)

    cases = {
        "shape": dict(x=x[:, :, :6], y=y),
        "'x' and 'y'": dict(x=x),
        "labels": dict(x=x, y=y[:3]),
        "lie in": dict(x=x, y=y + 7),
        "input range": dict(x=x * 2, y=y),
        "'x_clean' has shape": dict(x=x, y=y, x_clean=x[:2]),
        "found": dict(x=x, y=y, extra=y),
    }
    for message, arrays in cases.items():
        with pytest.raises(HardenError, match=message):
            load(f"{len(message)}.npz", **arrays)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "objects.npz").write_bytes((tmp_path / "objects.npy").read_bytes())
    with pytest.raises(HardenError, match="readable .npz"):
        load_adversarial(tmp_path / "objects.npz", input_shape=(1, 8, 8), num_classes=10, input_range=RANGE)
    assert load("ok.npz", x=x, y=np.eye(10)[y]).y.tolist() == y.tolist()   # one-hot labels
