"""The package root exposes the API the README shows, and nothing it does not have."""

from __future__ import annotations

import re
from pathlib import Path

import harden


def test_every_name_the_readme_calls_is_exposed():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    called = set(re.findall(r"\bharden\.([a-z_]+)\(", readme))
    assert called, "the README shows the API"
    assert called <= set(harden.__all__), called - set(harden.__all__)
    for name in harden.__all__:
        assert callable(getattr(harden, name))
