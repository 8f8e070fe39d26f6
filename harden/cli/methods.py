"""``harden methods [NAME]``: the detection methods, and one method's options with their defaults and help."""

from __future__ import annotations

import inspect

import typer
from rich.table import Table
from rich.text import Text

from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, stdout


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods(
        name: str = typer.Argument(None, help="A method: list its options (default: list the methods)."),
        json_out: bool = JSON_OPTION,
    ):
        """List the detection methods, or one method's options (what --method NAME:key=value,... takes)."""
        with errors_to_exit():
            from harden.core.options import help_rows
            from harden.methods import load_all  # noqa: F401  (registers every method)
            from harden.methods.base import METHODS

            if name is None:
                rows = [(n, _summary(METHODS.get(n)), "yes" if METHODS.get(n).finetunes else "no")
                        for n in METHODS.names()]
                if json_out:
                    emit_json([{"name": n, "summary": s, "finetunes": f == "yes"} for n, s, f in rows])
                    return
                table = Table(title="methods (`harden methods NAME` lists one's options)")
                for column in ("method", "what it does", "fine-tunes the classifier"):
                    table.add_column(column)
                for row in rows:
                    table.add_row(*map(Text, row))
                stdout.print(table)
                return
            method = METHODS.get(name.strip().lower())
            rows = help_rows(method.option_set.params())
            if json_out:
                emit_json({"name": method.name, "summary": _summary(method),
                           "options": [dict(zip(("name", "type", "default", "help"), r)) for r in rows]})
                return
            stdout.print(f"{method.name}: {_summary(method)}", highlight=False)
            if not rows:
                stdout.print("no options of its own", highlight=False)
                return
            table = Table(title=f"--method {method.name}:key=value,...")
            for column in ("option", "type", "default", "help"):
                table.add_column(column)
            for row in rows:
                table.add_row(*map(Text, row))
            stdout.print(table)


def _summary(method) -> str:
    doc = inspect.getdoc(method) or ""
    return doc.split("\n\n")[0].replace("\n", " ")
