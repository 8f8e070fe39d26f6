"""How a bench hands its JSON document over: printed, and written to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def emit(doc: dict, out: Path | None) -> None:
    text = json.dumps(doc, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def measure_or_tabulate(args, measure: Callable[[object], dict], markdown: Callable[[list[Path]], str]) -> None:
    """The certificate benches' last step: with ``--markdown FILES`` print the table of earlier runs, else
    measure on one torch thread and emit the document."""
    import torch

    torch.set_num_threads(1)
    if args.markdown:
        print(markdown(args.markdown))
        return
    emit(measure(args), args.out)
