"""The report stage: every figure measured once (:mod:`.collect`), drawn with matplotlib (:mod:`.plots`) and
written as one self-contained HTML file (:mod:`.html`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harden.io.atomic import atomic_write_bytes


def write_html(report: dict, path: str | Path, progress: Callable[[str, float], None] = lambda m, f: None) -> int:
    """Render ``report`` (the JSON of :func:`harden.report.collect.collect`) to ``path`` atomically; its size."""
    from harden.report.html import render

    data = render(report, progress).encode("utf-8")
    atomic_write_bytes(Path(path), data)
    return len(data)
