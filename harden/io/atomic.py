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
    """A temporary path to write; renamed onto ``path`` only if the block succeeds.

    Under torch.distributed every rank runs the same code, but rank 0 alone writes ``path``: the others write
    a throwaway file in the system's temporary folder, and rank 0 renames its file only once every rank has
    reached this point (a barrier), so a rank that failed on the way leaves no output; every rank then sees
    the file."""
    from harden.core.distributed import barrier, world

    path = check_output_path(Path(path))
    writer = world().writer
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if writer else None)
    os.close(fd)
    try:
        yield Path(tmp)
        barrier()
        if writer:
            os.replace(tmp, path)
        barrier()   # the output exists for every rank from here on
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
