"""Progress of long work: ``progress(message, fraction)`` callbacks, and the one the Python API uses by default.

The CLI draws a rich bar (harden.cli.common.progress_reporter); a script or notebook calling harden's API gets
plain lines on stderr instead, at most one every few seconds unless the message changes, so that a twenty-minute
run is never silent.  ``progress=False`` silences it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Progress = Callable[[str, float], None]


def silent(message: str, fraction: float) -> None:
    pass


class StderrProgress:
    """``harden: <message> [42%, 1m05s elapsed, ~1m30s left]`` lines on ``stream``."""

    def __init__(self, stream: TextIO | None = None, every: float = 5.0):
        self.stream = stream or sys.stderr
        self.every = every
        self.started = time.monotonic()
        self.last_message: str | None = None
        self.last_time = float("-inf")

    def __call__(self, message: str, fraction: float) -> None:
        now = time.monotonic()
        if message == self.last_message and now - self.last_time < self.every:
            return
        self.last_message, self.last_time = message, now
        fraction = max(0.0, min(1.0, float(fraction)))
        elapsed = now - self.started
        parts = [f"{100 * fraction:.0f}%", f"{_duration(elapsed)} elapsed"]
        if 0.02 <= fraction < 1.0:   # below 2% an estimate is noise
            parts.append(f"~{_duration(elapsed * (1 - fraction) / fraction)} left")
        print(f"harden: {message} [{', '.join(parts)}]", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def resolve_progress(progress: Progress | bool | None) -> Progress:
    """None or True: lines on stderr; False: nothing; a callable: itself."""
    if progress is None or progress is True:
        return StderrProgress()
    if progress is False:
        return silent
    return progress


def part(progress: Progress, start: float, end: float) -> Progress:
    """``progress`` for one stage of several: its 0..1 drawn on ``start``..``end`` of the whole."""
    return lambda message, fraction: progress(message, start + (end - start) * max(0.0, min(1.0, fraction)))
