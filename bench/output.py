"""How a bench hands its JSON document over: printed, and written to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(doc: dict, out: Path | None) -> None:
    text = json.dumps(doc, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
