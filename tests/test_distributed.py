"""torch.distributed: two gloo ranks (``--workers 2``, torchrun's launcher) give the single process's results.

Fine-tuning matches within float rounding (same kept check, thresholds and calibration figures within 1e-5);
certify and evaluate, whose work is per sample, merge into EXACTLY the single-process report; a rank that is
killed fails the command with one line naming it and leaves no output.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harden.core import distributed
from harden.train.parallel import DataParallel

ROOT = Path(__file__).resolve().parents[1]
ARCH = "conftest:TinyCNN"


def harden_cli(*args, workers: int | None = None, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """The real command in a fresh process (ranks are real processes too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           **env}
    env.pop("HARDEN_DEBUG", None)
    command = [sys.executable, "-m", "harden.cli", *map(str, args)] + (["--workers", str(workers)] if workers else [])
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("dist")
    torch.save(tiny_model.state_dict(), path / "tiny.pt")
    return path


@pytest.fixture(scope="module")
def pipelines(folder, one_thread):
    """The same fine-tuning, certify and evaluate by one process (here) and by two gloo ranks."""
    from ranks import harden_pipeline, run_ranks

    return harden_pipeline(folder), run_ranks(harden_pipeline, folder, size=2)


def _close(a, b, path="", tol=1e-5):
    """Every number of two JSON documents within ``tol`` (relative above 1), everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key not in ("bundle_id", "created", "seconds", "fit_seconds"):
                _close(a[key], b[key], f"{path}/{key}", tol)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _close(u, v, f"{path}[{i}]", tol)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _without_seconds(report):
    if isinstance(report, dict):
        return {k: _without_seconds(v) for k, v in report.items() if k != "seconds"}
    if isinstance(report, list):
        return [_without_seconds(v) for v in report]
    return report


def test_two_ranks_fine_tune_as_one_process(pipelines):
    one, two = (p["manifest"] for p in pipelines)
    finetune = [m["methods"][0]["config"]["finetune"] for m in (one, two)]
    assert finetune[0]["best_epoch"] == finetune[1]["best_epoch"]
    assert finetune[0]["steps_taken"] == finetune[1]["steps_taken"] == 20
    # the kept check, thresholds, scales, calibration counts and figures, the fine-tuning history: within 1e-5
    _close(one, two)
    for (name, a), (_, b) in zip(pipelines[0]["heads"].items(), pipelines[1]["heads"].items()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5), name


@pytest.fixture(scope="module")
def trainings(folder, one_thread):
    """lan's g and f2 on a classifier fine-tuned with ``--finetune flow``, by one process and by two gloo ranks."""
    from ranks import run_ranks, training_pipeline

    return training_pipeline(folder), run_ranks(training_pipeline, folder, size=2)


def test_two_ranks_train_lan_and_the_flow_objective_as_one_process(trainings):
    one, two = (t["manifest"] for t in trainings)
    assert [c["step"] for c in one["finetune"]["history"]] == [0, 3, 6]
    _close(one["finetune"], two["finetune"])   # every flow check, the kept step: within 1e-5
    lan = [m["methods"][0]["config"] for m in (one, two)]
    assert len(lan[0]["g_training"]) == 10 and lan[0]["g_training"][0]["loss"] > 0
    _close(lan[0]["g_training"], lan[1]["g_training"])   # g's loss history
    _close(lan[0]["mask_mean_train"], lan[1]["mask_mean_train"])
    tensors = [t["tensors"] for t in trainings]
    assert tensors[0].keys() == tensors[1].keys()
    for name, a in tensors[0].items():
        if not name.startswith("head.f2."):   # the classifier and g
            assert torch.allclose(a.double(), tensors[1][name].double(), rtol=1e-5, atol=1e-5), name
    # f2 learns from g's masks, which differ from one process's in the 7th digit; its training (Adam, 300 steps)
    # turns that into weights ~1e-2 apart, as it does for one process fed masks moved by 1e-7
    # (docs/results/scale-out.md). On the same masks, two ranks train f2 as one process does:
    assert abs(lan[0]["train"]["agreement"] - lan[1]["train"]["agreement"]) <= 0.05


def test_two_ranks_train_lans_mask_classifier_as_one_process(folder, one_thread):
    from ranks import mask_classifier_task, run_ranks

    one, two = mask_classifier_task(folder), run_ranks(mask_classifier_task, folder, size=2)
    for name, a in one.items():
        assert torch.allclose(a, two[name], rtol=1e-5, atol=1e-5), name


def test_certify_with_two_ranks_equals_one_process_exactly(pipelines):
    one, two = (p["certify"] for p in pipelines)
    assert one == two   # 60 samples: four batches, split 2 + 2 across the ranks
    assert one["samples"] == 60 and one["check"]["0.02"]["points"] == 2 * 60 * 4


def test_evaluate_with_two_ranks_equals_one_process_exactly(pipelines):
    one, two = (_without_seconds(p["evaluate"]) for p in pipelines)
    assert one == two   # 90 inputs: three attack chunks, split 2 + 1 across the ranks
    assert one["rows"][1]["n_correct"] > 0
    assert pipelines[0]["adaptive"] == pipelines[1]["adaptive"]   # 20 inputs: three chunks


def test_the_workers_option_runs_torchrun_and_merges_into_the_same_report(pipelines, folder):
    from harden.api import certify
    from harden.bundle.archive import load_bundle

    bundle = folder / "pipeline-1.hardened"
    result = harden_cli("certify", bundle, "--eps", "0.02", "--check", "4", "--batch-size", "40", "--json",
                        workers=2)
    assert result.returncode == 0, result.stderr
    hardened, manifest = load_bundle(bundle)
    expected = json.loads(json.dumps(certify(hardened, manifest, [0.02], check=4, batch_size=40)))
    assert json.loads(result.stdout) == expected


def _rank_processes(parent: int, rank: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and f"HARDEN_TEST_RUN={parent}".encode() in environ:
            found.append(int(entry.name))
    return found


def _catches_sigterm(pid: int) -> bool:
    """The rank entered harden.core.distributed.session (it installs a SIGTERM handler before joining)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_fails_the_command_in_one_line_and_leaves_no_output(folder):
    out = folder / "killed.hardened"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "HARDEN_TEST_RUN": str(os.getpid())}
    # a long fine-tuning: the rank dies in it
    args = ["--arch", ARCH, "--data", "digits", "--limit", "600", "--key", "dist",
            "--method", "ctt-strict:mask_ratio=0.05,eps=0.01,steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "harden.cli", "instrument", str(folder / "tiny.pt"), *args,
                             "-o", str(out), "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            ranks = _rank_processes(os.getpid(), 1)
            if ranks and _catches_sigterm(ranks[0]):
                victim = ranks[0]
                break
            time.sleep(0.2)
        assert victim is not None, "rank 1 never joined"
        time.sleep(1.0)   # into its work
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: rank 1 of 2 failed: killed by signal SIGKILL"], stderr
    assert not out.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{out.name}")]   # no temporary file either
    time.sleep(0.5)
    assert _rank_processes(os.getpid(), 0) == [] and _rank_processes(os.getpid(), 1) == []


# ------------------------------------------------------------------------------------------------ one process


def test_chunks_cover_the_samples_once_in_order():
    parts = distributed.chunks(10, 4)
    assert parts == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert distributed.map_chunks(10, 4, lambda s: list(range(s.start, s.stop))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert distributed.my_chunks(10, 4) == list(enumerate(parts))   # one process: every chunk is its own
    assert distributed.map_chunks(0, 4, lambda s: 1) == []


def test_chunk_seeds_depend_on_the_chunk_not_on_the_process():
    a = distributed.chunk_seed(0, slice(0, 128), "fgsm")
    assert a == distributed.chunk_seed(0, slice(0, 128), "fgsm")
    assert len({a, distributed.chunk_seed(0, slice(128, 256), "fgsm"), distributed.chunk_seed(1, slice(0, 128), "fgsm"),
                distributed.chunk_seed(0, slice(0, 128), "pgd")}) == 4


def test_data_parallel_is_transparent_in_one_process():
    module = torch.nn.Linear(3, 2)
    dp = DataParallel(module)
    idx = torch.arange(5)
    assert dp.module is module
    rows, weight = dp.shard(idx)
    assert torch.equal(rows, idx) and weight == 1.0 and dp.share(idx) == 1.0
    assert torch.equal(dp.sum(torch.ones(2)), torch.ones(2)) and dp.agree(True) and not dp.agree(False)


def test_secrets_reach_the_ranks_through_the_environment_not_their_command_line(monkeypatch):
    import typer.main

    from harden.cli.app import app
    from harden.cli.workers import _command_line

    monkeypatch.delenv("HARDEN_SEAL_KEY", raising=False)
    command = typer.main.get_command(app).commands["certify"]
    ctx = command.make_context("certify", ["b.hardened", "--seal-key", "s3cret", "--eps", "0.01", "--workers", "2"])
    line, env = _command_line(ctx)
    assert env == {"HARDEN_SEAL_KEY": "s3cret"}
    assert "s3cret" not in line and "--workers" not in line
    assert line[0] == "certify" and line[-2:] == ["--", "b.hardened"] and line[line.index("--eps") + 1] == "0.01"
