"""Progress: the Python API's stderr lines (with an estimate of the time left) and stage shares."""

from __future__ import annotations

import io

from harden.core.progress import StderrProgress, part, resolve_progress, silent


def test_stderr_lines_carry_fraction_and_estimate():
    stream = io.StringIO()
    say = StderrProgress(stream, every=0.0)
    say("attack 1/2", 0.0)
    say("attack 2/2", 0.5)
    say("done", 1.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("harden: attack 1/2 [0%") and "left" not in lines[0]
    assert "[50%" in lines[1] and "left" in lines[1]
    assert "[100%" in lines[2] and "left" not in lines[2]


def test_repeated_message_is_throttled():
    stream = io.StringIO()
    say = StderrProgress(stream, every=3600.0)
    for k in range(10):
        say("training", k / 10)
    say("calibrating", 0.95)
    assert stream.getvalue().count("training") == 1 and "calibrating" in stream.getvalue()


def test_part_maps_a_stage_onto_its_share():
    seen = []
    share = part(lambda m, f: seen.append(f), 0.5, 1.0)
    share("a", 0.0), share("b", 0.5), share("c", 2.0)
    assert seen == [0.5, 0.75, 1.0]


def test_resolve():
    assert resolve_progress(False) is silent
    assert isinstance(resolve_progress(None), StderrProgress)
    mine = lambda m, f: None   # noqa: E731
    assert resolve_progress(mine) is mine


def test_api_instrument_reports_progress_by_default(capsys):
    import torch

    import harden
    from harden.io.data import load_data
    from harden.methods.base import Options
    from conftest import TinyCNN

    torch.manual_seed(0)
    data = load_data("digits", limit=300)
    model = TinyCNN()
    harden.instrument(model, data, ["ctt-lite"], Options(key="k", fpr=0.1))
    err = capsys.readouterr().err
    assert "harden: fitting ctt-lite" in err and "harden: calibrating" in err
