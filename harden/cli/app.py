"""The ``harden`` command: thin wrappers over the Python API, one file per command."""

from __future__ import annotations

import typer

from harden.cli import certify, evaluate, export, inspect, instrument, layers

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Harden a PyTorch image classifier: add adversarial-input detectors, export one ONNX graph, certify it.",
)
for module in (layers, instrument, export, certify, evaluate, inspect):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
