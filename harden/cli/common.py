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
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"internal error ({type(exc).__name__}): {first} (set HARDEN_DEBUG=1 for the traceback)", 3)


def emit_json(payload: Any) -> None:
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
    """A rich progress display fed by ``report(message, fraction)``; silent for --json."""
    if not enabled:
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


def check_plot_path(path) -> None:
    """A --plot target: a .png file in an existing folder (checked before any work starts)."""
    from pathlib import Path

    from harden.io.atomic import check_output_path

    if Path(path).suffix.lower() != ".png":
        raise HardenError(f"--plot {path}: the plot is a PNG image; name the file *.png")
    check_output_path(Path(path))
