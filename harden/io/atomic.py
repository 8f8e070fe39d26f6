"""Outputs are written to a temporary file beside the target and renamed, so a failed run leaves nothing.

:func:`check_output_path` runs before any work starts: the target must be a new or regular file (never a
folder, FIFO, device or socket, never a symbolic link, never one of the command's own input files), in a
folder that exists and that harden can create files in.  Temporary files are registered while they exist,
so that the CLI's SIGTERM handler can remove them (:func:`remove_pending`) when no ``finally`` runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from harden.errors import HardenError

_PENDING: set[str] = set()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: Path, inputs: Iterable[str | Path | None] = (), flag: str = "-o") -> Path:
    """``path`` if harden may write it; one clear HardenError otherwise (checked before the work starts)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise HardenError(f"cannot write {where}: {exc.strerror}") from None
    if info is not None:
        mode = info.st_mode
        if stat.S_ISLNK(mode):
            raise HardenError(f"cannot write {where}: it is a symbolic link (harden does not write through links); "
                              "name the file it points to, or remove the link")
        if stat.S_ISDIR(mode):
            raise HardenError(f"cannot write {where}: it is a folder")
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise HardenError(f"cannot write {where}: it is {kind}")
        for source in inputs:
            if source is not None and _same_file(path, Path(source)):
                raise HardenError(f"cannot write {where}: it is the input file {source}; choose another output name")
    parent = path.parent
    if not parent.exists():
        raise HardenError(f"cannot write {where}: folder {parent} does not exist")
    if not parent.is_dir():
        raise HardenError(f"cannot write {where}: {parent} is not a folder")
    _probe_folder(parent, where)
    return path


def _probe_folder(folder: Path, where: str) -> None:
    """Create and remove one empty file: the only test of writability that permissions, ACLs, read-only mounts
    and quotas all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".harden-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = "no permission to create files there" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror
        raise HardenError(f"cannot write {where}: {reason} (folder {folder})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: Path, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """A temporary path to write; renamed onto ``path`` only if the block succeeds."""
    path = check_output_path(Path(path), inputs, flag="")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise HardenError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    _PENDING.add(tmp)
    try:
        try:
            yield Path(tmp)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
                raise HardenError(f"cannot write {path}: {exc.strerror}") from None
            raise
        try:
            os.chmod(tmp, _new_file_mode())   # mkstemp makes 0600; the output gets what any new file would
            os.replace(tmp, path)
        except OSError as exc:
            raise HardenError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        _PENDING.discard(tmp)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_file_mode() -> int:
    """0666 less the process umask: the mode open() would give a new file."""
    mask = os.umask(0)   # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def remove_pending() -> None:
    """Remove every temporary file an interrupted write left (called by the CLI's signal handler)."""
    for tmp in list(_PENDING):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _PENDING.discard(tmp)


def atomic_write_bytes(path: Path, data: bytes, inputs: Iterable[str | Path | None] = ()) -> None:
    with atomic_path(path, inputs) as tmp:
        tmp.write_bytes(data)
