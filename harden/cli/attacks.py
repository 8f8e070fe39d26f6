"""``harden attacks [NAME]``: the attacks `harden evaluate --attack` runs, and one attack's parameters."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, stdout

# Named in `harden evaluate --help` without importing the attack library (a test keeps this list complete).
ATTACK_NAMES = ("fgsm", "bim", "pgd", "deepfool", "cw", "jsma", "hopskipjump", "boundary", "noise", "blur",
                "saltpepper", "stadv")


def register(app: typer.Typer) -> None:
    @app.command("attacks")
    def attacks(
        name: str = typer.Argument(None, help="An attack: list its parameters (default: list the attacks)."),
        json_out: bool = JSON_OPTION,
    ):
        """List the attacks of `harden evaluate --attack`, or one attack's parameters (NAME:param=value,...)."""
        with errors_to_exit():
            from harden.attacks.catalog import ATTACKS
            from harden.core.options import help_rows

            if name is None:
                builders = {n: ATTACKS.get(n) for n in ATTACKS.names()}
                rows = [(n, b.summary.split("\n")[0], "black box" if b.black_box else "white box")
                        for n, b in builders.items() if b.name == n]
                if json_out:
                    emit_json([dict(zip(("name", "summary", "access"), r)) for r in rows])
                    return
                table = Table(title="attacks (`harden attacks NAME` lists one's parameters)")
                for column in ("attack", "what it does", "needs"):
                    table.add_column(column)
                for row in rows:
                    table.add_row(*map(Text, row))
                stdout.print(table)
                return
            builder = ATTACKS.get(name.strip().lower())
            rows = help_rows(builder.params)
            if json_out:
                emit_json({"name": builder.name, "summary": builder.summary,
                           "parameters": [dict(zip(("name", "type", "default", "help"), r)) for r in rows]})
                return
            stdout.print(Text(f"{builder.name}: {builder.summary}"))
            table = Table(title=f"--attack {builder.name}:param=value,...")
            for column in ("parameter", "type", "default", "help"):
                table.add_column(column)
            for row in rows:
                table.add_row(*map(Text, row))
            stdout.print(table)
