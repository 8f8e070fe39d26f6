"""What every command shares: the error funnel, JSON output, progress bars and option types.

The funnel: a refusal is ONE line on stderr and exit 2 (bad input) whatever raised it (harden, typer's own
argument parsing (harden/cli/app.py), torch's or onnxruntime's loggers, silenced unless ``HARDEN_DEBUG=1``);
"internal error" and exit 3 are kept for harden's own bugs.  SIGTERM (what ``timeout``, docker and
Kubernetes send) and SIGINT stop the command with one line and remove the temporary file of an
unfinished write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harden.errors import HardenError

console = Console(stderr=True)
stdout = Console()

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def debug() -> bool:
    return os.environ.get("HARDEN_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    # One line, always: torch.fx appends "While executing ..." lines to exceptions raised inside it.
    from rich.markup import escape

    message = (message.strip().splitlines() or [""])[0]
    # escape: square brackets in a path or a refused name are text, not rich markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt so that every ``finally`` runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_LIBRARY_LOGGERS = ("torch", "onnxruntime", "onnxscript", "onnx", "skl2onnx", "art", "matplotlib", "PIL")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Libraries' log records and warnings stay off the user's terminal (all of it back with HARDEN_DEBUG=1)."""
    if debug():
        yield
        return
    names = [n for n in list(logging.root.manager.loggerDict)
             if any(n == p or n.startswith(p + ".") for p in _LIBRARY_LOGGERS)] + list(_LIBRARY_LOGGERS)
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    saved = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except Exception:  # noqa: BLE001 - without onnxruntime there is nothing to silence
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, disabled in saved:
            lg.disabled = disabled


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """HardenError -> one clear line and exit 2; anything else -> one line and exit 3 (traceback with HARDEN_DEBUG=1)."""
    from harden.io.atomic import remove_pending

    try:
        with _signals(), quiet_libraries():
            yield
    except (typer.Exit, typer.Abort):
        raise
    except HardenError as exc:
        if debug():
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        remove_pending()
        fail("interrupted", EXIT_INTERRUPTED)
    except Terminated:
        remove_pending()
        fail("terminated (SIGTERM); no output was written", EXIT_TERMINATED)
    except MemoryError:
        if debug():
            raise
        fail("out of memory: the input needs more memory than this machine has (try --limit or a smaller model)")
    except RecursionError:
        if debug():
            raise
        fail("the input is nested too deeply to process")
    except Exception as exc:  # the funnel: no traceback for users unless asked
        if debug():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"internal error ({type(exc).__name__}): {first} (set HARDEN_DEBUG=1 for the traceback)", EXIT_INTERNAL)


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
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
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


SEAL_HELP = ("Secret (at least 16 characters) of the bundle's integrity seal (HMAC-SHA256; docs/SECURITY.md): "
             "instrument seals with it, every other command refuses a bundle whose seal does not match. Prefer the "
             "HARDEN_SEAL_KEY environment variable to the flag (other users can read a command line).")


def seal_option():
    return typer.Option(None, "--seal-key", envvar="HARDEN_SEAL_KEY", show_envvar=True, help=SEAL_HELP)
