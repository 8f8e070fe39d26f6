"""What every command shares: the error funnel, JSON output, progress bars and option types."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from harden.errors import HardenError

console = Console(stderr=True)
stdout = Console()


def debug() -> bool:
    return os.environ.get("HARDEN_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> None:
    # One line, always: torch.fx appends "While executing ..." lines to exceptions raised inside it.
    message = (message.strip().splitlines() or [""])[0]
    rank = _rank_label()
    if rank is not None:   # one rank of several: the launcher reads the line from the rank's error file
        from harden.cli.workers import LAUNCHED_BY_WORKERS, record_failure

        record_failure(message)
        if os.environ.get(LAUNCHED_BY_WORKERS):   # the --workers process reports it, naming the rank
            raise typer.Exit(code)
        message = f"{rank}: {message}"
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _rank_label() -> str | None:
    """"rank R of N" in a process that torchrun started as one of several, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1") or "1")
    return f"rank {os.environ.get('RANK', '?')} of {size}" if size > 1 else None


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """HardenError -> one clear line and exit 2; anything else -> one line and exit 3 (traceback with HARDEN_DEBUG=1)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except HardenError as exc:
        if debug():
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # the funnel: no traceback for users unless asked
        if debug():
            raise
        from harden.cli.workers import failed_rank_line

        lost = failed_rank_line(exc)
        if lost is not None:
            fail(lost, 3)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"internal error ({type(exc).__name__}): {first} (set HARDEN_DEBUG=1 for the traceback)", 3)


@contextlib.contextmanager
def ranks(device: str = "cpu") -> Iterator[Any]:
    """The command's torch.distributed world (one process unless torchrun / --workers started several): rank 0
    alone prints results and progress; the others stay silent but for their own error."""
    from harden.core.distributed import session

    with session(device) as world:
        quiet = stdout.quiet
        stdout.quiet = quiet or not world.writer
        try:
            yield world
        finally:
            stdout.quiet = quiet


def emit_json(payload: Any) -> None:
    if int(os.environ.get("RANK", "0") or "0") != 0:   # one report: rank 0's
        return
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


@contextlib.contextmanager
def progress_reporter(enabled: bool) -> Iterator[Callable[[str, float], None]]:
    """A rich progress display fed by ``report(message, fraction)``; silent for --json and on every rank but 0."""
    if not enabled or int(os.environ.get("RANK", "0") or "0") != 0:
        yield lambda message, fraction: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=1.0)

        def report(message: str, fraction: float) -> None:
            progress.update(task, description=message, completed=max(0.0, min(1.0, fraction)))

        yield report


def parse_range(text: str) -> tuple[float, float]:
    from harden.io.data import parse_input_range

    return parse_input_range(text)


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
