"""``harden layers``: what can be instrumented."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, stdout
from harden.errors import HardenError


def _example_input(data: str | None, input_shape: str | None, input_range: str) -> torch.Tensor | None:
    if input_shape:
        try:
            shape = tuple(int(v) for v in input_shape.replace("x", ",").split(","))
        except ValueError:
            raise HardenError(f"--input-shape {input_shape!r} must look like 1,28,28") from None
        if len(shape) != 3 or min(shape) < 1:
            raise HardenError(f"--input-shape {input_shape!r} must be three sizes >= 1 (channels, height, width)")
        from harden.core.limits import check_elements

        check_elements((2, *shape), f"--input-shape {input_shape}")
        return torch.zeros((2, *shape))
    if data:
        from harden.io.data import load_data, parse_input_range

        return load_data(data, input_range=parse_input_range(input_range), limit=8).train.x[:2]
    return None


def register(app: typer.Typer) -> None:
    @app.command("layers")
    def layers(
        model: Path = typer.Argument(..., help="model.pt2, or model.pt with --arch"),
        arch: str = typer.Option(None, "--arch", help="package.module:factory building the model for a state_dict"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a whole pickled module (runs code from the file)."),
        data: str = typer.Option(None, "--data", help="Data to take the input shape from (mnist, digits, x.npz, folder, x.pt)."),
        input_shape: str = typer.Option(None, "--input-shape", help="Per-sample input shape, e.g. 1,28,28 (instead of --data)."),
        input_range: str = typer.Option("0,1", "--input-range", help="The model's input range lo,hi (for --data)."),
        json_out: bool = JSON_OPTION,
    ):
        """List every node: name, module path, canonical op, output shape, and which nodes are sites."""
        with errors_to_exit():
            from harden.graph.analyse import NodeInfo, describe
            from harden.graph.ops import SITE_OPS, canonical_op, op_spelling
            from harden.graph.trace import module_path, trace
            from harden.io.model import load_model

            gm = trace(load_model(model, arch, trust_pickle))
            example = _example_input(data, input_shape, input_range)
            if example is not None:
                from harden.graph.sizes import check_sizes

                check_sizes(gm, tuple(example.shape), "the model")   # no tensor above the caps, before it runs
                infos = describe(gm, example)
            else:
                infos = [
                    NodeInfo(n.name, module_path(n), canonical_op(gm, n), op_spelling(gm, n), None,
                             canonical_op(gm, n) in SITE_OPS)
                    for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
                ]
            rows = [
                {"name": i.name, "module": i.module_path, "op": i.op or "unsupported", "spelling": i.spelling,
                 "shape": list(i.shape) if i.shape is not None else None, "site": i.is_site}
                for i in infos
            ]
            sites = [r["name"] for r in rows if r["site"]]
            defaults = default_sites(sites, {r["name"]: r["module"] for r in rows})
            if json_out:
                emit_json({"model": str(model), "nodes": rows, "sites": sites, "default_sites": defaults})
                return
            table = Table(title=f"{model.name}: {len(sites)} site(s)")
            for column in ("name", "module", "op", "shape", "site", "default for"):
                table.add_column(column)
            for r in rows:
                shape = "x".join(map(str, r["shape"])) if r["shape"] else ("-" if example is not None else "(give --data)")
                table.add_row(r["name"], r["module"], r["op"], shape, "site" if r["site"] else "",
                              _picked_by(r["name"], defaults) if r["site"] else "")
            stdout.print(table)
            if sites:
                stdout.print("Other sites: --method M:layers=all | last:K | deepest:K | name,name", markup=False)


def default_sites(sites: list[str], paths: dict[str, str]) -> dict[str, list[str]]:
    """Per method with a ``layers`` option: the sites its default takes on this model."""
    from harden.methods import load_all  # noqa: F401  (registers every method)
    from harden.methods.base import METHODS, select_sites

    out = {}
    if not sites:
        return out
    for name in METHODS.names():
        option_set = METHODS.get(name).option_set
        layers = {p.name: p for p in option_set.params()}.get("layers")
        if layers is not None:
            out[name] = select_sites(sites, paths, str(layers.default))
    return out


def _picked_by(site: str, defaults: dict[str, list[str]]) -> str:
    """The methods whose default takes this site, the CTT variants as one ``ctt-*`` when all of them do."""
    methods = [m for m, chosen in defaults.items() if site in chosen]
    ctt = [m for m in defaults if m.startswith("ctt-")]
    if ctt and all(m in methods for m in ctt):
        methods = ["ctt-*"] + [m for m in methods if m not in ctt]
    return ", ".join(methods)
