"""How much a file from elsewhere may make harden allocate, checked before anything is allocated.

A bundle, a ``.pt2`` program or a data file can come from someone else.  Every size it states (a zip
member's length, an array's shape, a tensor a graph creates, a count in a manifest) is compared with
these caps first, so that a small crafted file cannot exhaust memory.  They are far above what a real
image classifier needs (the largest model of the suite uses well under 1% of each).
"""

from __future__ import annotations

import math
from typing import Iterable

from harden.errors import HardenError

MiB = 1 << 20
GiB = 1 << 30

MAX_ARCHIVE_MEMBERS = 4096          # files inside one zip (bundle, .pt2, .npz)
MAX_MEMBER_BYTES = 2 * GiB          # uncompressed size of one member
MAX_ARCHIVE_BYTES = 8 * GiB         # uncompressed size of all members together
MAX_JSON_BYTES = 256 * MiB          # a JSON member (manifest, graph document, program)
MAX_COMPRESSION_RATIO = 200         # uncompressed / compressed, for members above RATIO_FLOOR_BYTES
RATIO_FLOOR_BYTES = 1 * MiB         # small members (a manifest of zeros) may compress better
MAX_TENSOR_ELEMENTS = 1 << 28       # one tensor a file makes harden build (1 GiB of float32)
MAX_TOTAL_ELEMENTS = 1 << 30        # every tensor of one graph or head together
MAX_JSON_DEPTH = 64                 # nesting of any JSON document read from a file


def check_elements(shape: Iterable, where: str, cap: int = MAX_TENSOR_ELEMENTS) -> int:
    """The element count of ``shape`` (non-negative ints), or a HardenError when it is malformed or above ``cap``."""
    dims = list(shape)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise HardenError(f"{where}: malformed shape {dims!r:.80}")
    count = math.prod(dims)
    if count > cap:
        raise HardenError(f"{where}: shape {dims!r:.80} has {count:,} elements, above the cap of {cap:,}")
    return count


def check_json_depth(value, where: str, depth: int = 0) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (Python's recursion would fail later, far from the cause)."""
    if depth > MAX_JSON_DEPTH:
        raise HardenError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        for item in value.values():
            check_json_depth(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json_depth(item, where, depth + 1)
