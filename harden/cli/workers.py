"""``--workers N``: run a command as N torch.distributed ranks on this machine, with torchrun's own launcher.

The command line is rebuilt from the parsed options and handed to ``torch.distributed.run`` (``torchrun
--standalone --nproc-per-node N -m harden.cli ...``): every rank runs the same command and
:func:`harden.core.distributed.session` joins them.  Each rank that fails writes its one-line error to the
error file torchrun gives it (``TORCHELASTIC_ERROR_FILE``); the launcher stops the other ranks, and this
process reports the failure in one line naming the rank.  Rank 0 alone writes outputs, and only once every
rank has finished (a barrier before the rename), so a failed run leaves none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from harden.errors import HardenError

WORKERS_HELP = ("Run as N torch.distributed processes on this machine (torchrun's launcher; gloo on CPU, NCCL on "
                "CUDA); the same as `torchrun --standalone --nproc-per-node N -m harden.cli ...`.")
# Set for the ranks that --workers starts: they leave the one error line to this process.
LAUNCHED_BY_WORKERS = "HARDEN_WORKERS_PARENT"
# A failure that only says another rank went away: the launcher reports the rank that caused it instead.
CONSEQUENCE = "lost contact with another rank"


def _command_line(ctx: Any) -> tuple[list[str], dict[str, str]]:
    """The command's name and its options as given (values from the parsed context), without --workers; and
    the environment variables that carry the options read from one (secrets)."""
    line, env = [ctx.info_name], {}
    positional = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "workers" or value is None:
            continue
        if param.param_type_name == "argument":
            positional += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        if param.is_flag:
            if value != param.default:
                line.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
            continue
        if getattr(param, "envvar", None) and not param.multiple:
            # a secret (--key, --seal-key) travels in the environment the ranks inherit, never on a command
            # line every user of the machine can read
            env[param.envvar if isinstance(param.envvar, str) else param.envvar[0]] = str(value)
            continue
        values = value if param.multiple else [value]
        for v in values:
            line += [param.opts[0], str(v)]
    return (line + ["--"] + positional if positional else line), env


def relaunch(ctx: Any, workers: int | None) -> bool:
    """Run the command as ``workers`` ranks when asked (and not already one of them); True when it ran so."""
    from harden.core.distributed import launched

    if workers is None or workers <= 1 or launched():
        if workers is not None and workers < 1:
            raise HardenError(f"--workers must be at least 1; got {workers}")
        return False
    command, env = _command_line(ctx)
    run_ranks(workers, command, env)
    return True


def run_ranks(workers: int, command: list[str], env: dict[str, str] | None = None) -> None:
    """``python -m harden.cli COMMAND`` as ``workers`` ranks; a failed rank raises HardenError naming it."""
    import harden

    # The ranks must import this very harden (a worktree, an editable install): put its folder first.
    root = str(Path(harden.__file__).resolve().parents[1])
    env = {**(env or {}), LAUNCHED_BY_WORKERS: "1",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    with _environment(env):   # the ranks inherit it; this process gets its own back
        _launch(workers, command)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _launch(workers: int, command: list[str]) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)   # the launcher's own log lines and failure summary
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={workers}", "--max-restarts=0",
                                "--monitor-interval=0.2", "--module", "harden.cli", *command])
    try:
        torchrun.run(args)
    except SignalException as exc:   # this process was stopped; the launcher has stopped the ranks
        raise HardenError(f"stopped by signal {signal.Signals(exc.sigval).name}; the ranks were stopped too") from None
    except ChildFailedError as exc:
        rank, failure, message = root_cause(exc.failures)
        if message is None and failure.exitcode > 0:
            import typer

            # A rank that chose its exit code without an error (e.g. certify's --check found a contradiction
            # and rank 0 printed it): the same code, nothing more to say.
            raise typer.Exit(failure.exitcode) from None
        if message is None:
            message = f"killed by signal {failure.signal_name()}"
        raise HardenError(f"rank {rank} of {workers} failed: {message}") from None


def root_cause(failures: dict) -> tuple[int, Any, str | None]:
    """The failed rank that caused the others to fail, its failure and its own one-line error (None when it
    wrote none: killed by a signal, or an exit code it chose)."""
    def own_message(failure) -> str | None:
        data = failure.error_file_data or {}
        message = data.get("message")
        if isinstance(message, dict):
            message = message.get("message")
        return message if isinstance(message, str) and message and message != "<NONE>" else None

    def cause_first(item):
        rank, failure = item
        message = own_message(failure) or ""
        # Consequences come last: a rank that only lost contact with another, or one the launcher stopped
        # (SIGTERM) once another had failed; an error of its own or another signal is a cause.
        return (message.startswith(CONSEQUENCE), failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=cause_first)
    return rank, failure, own_message(failure)


def record_failure(message: str) -> None:
    """Write a rank's one-line error where the launcher reads it (torchrun's error file), if there is one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        pass


def failed_rank_line(exc: BaseException) -> str | None:
    """A collective that failed because a peer went away, in one line (the cause is that peer's)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{CONSEQUENCE} ({first[:200]})"
    return None
