"""The ``harden`` command: thin wrappers over the Python API, one file per command."""

from __future__ import annotations

import typer
from typer._click.exceptions import UsageError   # typer's bundled click
from typer.core import TyperOption

_display_type = TyperOption.display_type_rich


def _flag_without_type(self, ctx):
    # typer's help shows a flag (--json) as taking a value (<bool>); a flag takes none.
    return None if self.is_flag else _display_type(self, ctx)


TyperOption.display_type_rich = _flag_without_type


def _usage_error_in_one_line(self, file=None) -> None:
    # typer prints usage, a hint and the error on four lines; harden's rule is one line per error.
    from harden.cli.common import console

    command = self.ctx.command_path.split()[1:] if self.ctx is not None else []   # the program may be "python -m"
    where = " ".join(["harden", *command, "--help"])
    console.print(f"[bold red]error:[/] {self.format_message()}{_method_option_hint(self)} (see {where})",
                  highlight=False, soft_wrap=True)


def _method_option_hint(error) -> str:
    """For a flag that is a method's option (--eps, --code, ...): how to give it now."""
    name = getattr(error, "option_name", None)
    if not name or not name.startswith("--"):
        return ""
    from harden.methods import load_all  # noqa: F401
    from harden.methods.base import METHODS

    wanted = name[2:].replace("-", "_")
    found = []
    for method in METHODS.names():
        options = {p.name for p in METHODS.get(method).option_set.params()}
        prefix = method.split("-")[0] + "_"
        for candidate in (wanted, wanted + "s", wanted.removeprefix(prefix)):
            if candidate in options:
                found.append(f"{method}:{candidate}=...")
                break
    return f"; it is a method option now: --method {' or '.join(found[:3])}" if found else ""


UsageError.show = _usage_error_in_one_line

from harden.cli import attacks, certify, evaluate, export, inspect, instrument, layers, methods, report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,   # help texts hold literal brackets ([default: 0], layers=[a,b])
    help="Harden a PyTorch image classifier: add adversarial-input detectors, export one ONNX graph, certify it.",
)
for module in (layers, methods, instrument, export, certify, evaluate, attacks, inspect, report):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
