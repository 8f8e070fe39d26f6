"""Outputs are written to a temporary file beside the target and renamed, so a failed run leaves nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from harden.errors import HardenError


def check_output_path(path: Path) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise HardenError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise HardenError(f"cannot write {path}: it is a folder")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; renamed onto ``path`` only if the block succeeds."""
    path = check_output_path(Path(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
