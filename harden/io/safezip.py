"""Zip archives and ``.npz`` arrays from elsewhere, read within the caps of :mod:`harden.core.limits`.

Every member's stated sizes are checked before anything is decompressed: its uncompressed length, the
archive's total, and the compression ratio (a zip bomb states a small compressed size and a huge
uncompressed one).  ``zipfile`` never returns more than a member's stated length, so the check bounds
what reading allocates.  Arrays are read from their ``.npy`` header and bytes, never unpickled, and only
when the header's shape accounts for exactly the bytes present.
"""

from __future__ import annotations

import ast
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from harden.core.limits import (
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_MEMBERS,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MAX_MEMBER_BYTES,
    RATIO_FLOOR_BYTES,
    check_json_depth,
)
from harden.errors import HardenError

_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


class SafeZip:
    """A zip archive whose members were checked against the caps when it was opened."""

    def __init__(self, source: bytes | str | Path, what: str, *, max_member: int = MAX_MEMBER_BYTES,
                 max_total: int = MAX_ARCHIVE_BYTES, kind: str = "zip archive"):
        self.what = what
        try:
            handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            self.zf = zipfile.ZipFile(handle)
            infos = self.zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise HardenError(f"{what} is not a readable {kind} ({_reason(exc)})") from None
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise HardenError(f"{what} holds {len(infos)} files, above the cap of {MAX_ARCHIVE_MEMBERS}")
        self.infos: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            name = info.filename
            if name in self.infos:
                raise HardenError(f"{what} holds two members named {name!r}")
            if info.flag_bits & 0x1:
                raise HardenError(f"{what}: member {name!r} is encrypted")
            if info.compress_type not in _METHODS:
                raise HardenError(f"{what}: member {name!r} uses compression method {info.compress_type} "
                                  "(only stored and deflate are read)")
            if info.file_size > max_member:
                raise HardenError(f"{what}: member {name!r} unpacks to {info.file_size:,} bytes, above the cap of "
                                  f"{max_member:,}")
            if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
                raise HardenError(f"{what}: member {name!r} unpacks {info.compress_size:,} bytes into "
                                  f"{info.file_size:,} (a ratio above {MAX_COMPRESSION_RATIO}: a zip bomb?)")
            total += info.file_size
            self.infos[name] = info
        if total > max_total:
            raise HardenError(f"{what} unpacks to {total:,} bytes, above the cap of {max_total:,}")

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def size(self, name: str) -> int:
        return self.infos[name].file_size

    def read(self, name: str, cap: int | None = None) -> bytes:
        info = self.infos.get(name)
        if info is None:
            raise HardenError(f"{self.what}: no member {name!r}")
        if cap is not None and info.file_size > cap:
            raise HardenError(f"{self.what}: member {name!r} holds {info.file_size:,} bytes, above the cap of {cap:,}")
        try:
            data = self.zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise HardenError(f"{self.what}: member {name!r} is damaged ({_reason(exc)})") from None
        except Exception as exc:  # zlib.error and friends: a damaged stream is bad input, not a bug
            raise HardenError(f"{self.what}: member {name!r} is damaged ({_reason(exc)})") from None
        if len(data) != info.file_size:
            raise HardenError(f"{self.what}: member {name!r} is truncated")
        return data

    def read_json(self, name: str) -> Any:
        data = self.read(name, MAX_JSON_BYTES)
        where = f"{self.what}: {name}"
        return parse_json(data, where)

    def read_npz(self, name: str) -> dict[str, np.ndarray]:
        return read_npz(self.read(name), f"{self.what}: {name}")

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> "SafeZip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_json(data: bytes, where: str) -> Any:
    try:   # NaN and Infinity parse (Python's json writes them in figures); fields that must be finite are checked
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HardenError(f"{where} is not valid JSON ({_reason(exc)})") from None
    check_json_depth(value, where)
    return value


def read_npz(source: bytes | str | Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, refusing pickled (object) arrays and headers that do not match their bytes."""
    arrays: dict[str, np.ndarray] = {}
    with SafeZip(source, what, kind=".npz (zip) archive of arrays") as archive:
        for member in archive.names():
            if not member.endswith(".npy"):
                raise HardenError(f"{what}: member {member!r} is not an .npy array")
            arrays[member[: -len(".npy")]] = read_npy(archive.read(member), f"{what}: {member}")
    return arrays


def read_npy(data: bytes, where: str) -> np.ndarray:
    """One ``.npy`` array, parsed from its header without numpy's pickle path."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy version {version}")
        header_length_size = 2 if version == (1, 0) else 4
        length = int.from_bytes(stream.read(header_length_size), "little")
        header_text = stream.read(length).decode("latin1" if version != (3, 0) else "utf-8")
        header = ast.literal_eval(header_text)
    except Exception as exc:  # noqa: BLE001 - a damaged header is bad input, whatever numpy raises
        raise HardenError(f"{where} is not a readable .npy array ({_reason(exc)})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise HardenError(f"{where}: malformed .npy header")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) or type(fortran) is not bool:
        raise HardenError(f"{where}: malformed .npy header (shape {shape!r:.60})")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception as exc:  # noqa: BLE001
        raise HardenError(f"{where}: unknown dtype {header['descr']!r:.60} ({_reason(exc)})") from None
    if dtype.hasobject:
        raise HardenError(f"{where} holds Python objects (pickled); harden reads numeric arrays only")
    offset = stream.tell()
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise HardenError(f"{where}: its header states shape {shape} of {dtype} ({expected:,} bytes) but it holds "
                          f"{len(data) - offset:,} bytes")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
