"""Atomic outputs: written whole or not at all, with the mode any new file gets under the umask."""

from __future__ import annotations

import os
import stat

import pytest

from harden.errors import HardenError
from harden.io.atomic import atomic_path, atomic_write_bytes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.bin").st_mode) == 0o666 & ~umask


def test_failed_block_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_folder(tmp_path):
    with pytest.raises(HardenError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"x")
