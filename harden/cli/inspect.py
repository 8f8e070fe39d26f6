"""``harden inspect``: what a bundle or an exported ONNX file holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, seal_option, stdout
from harden.errors import HardenError


def _describe_onnx(path: Path) -> dict:
    from harden.export.runtime import OnnxGraph

    from harden.bundle.manifest import validate_manifest

    graph = OnnxGraph(path)
    manifest = graph.manifest
    if not manifest:
        raise HardenError(f"{path} is an ONNX file but not one exported by harden (no harden.manifest metadata)")
    validate_manifest(manifest, f"{path}: harden.manifest")
    session = graph.session
    return {
        "kind": "onnx",
        "file": str(path),
        "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in session.get_outputs()],
        "metadata_keys": sorted(graph.metadata),
        "manifest": manifest,
    }


def _describe_bundle(path: Path, seal_key: str | None) -> dict:
    from harden.bundle.archive import load_bundle

    # the whole bundle is checked (graph, arrays, golden outputs), not only its manifest: what inspect shows
    # is what the other commands would use
    hardened, manifest = load_bundle(path, seal_key=seal_key)
    return {"kind": "bundle", "file": str(path), "outputs": [{"name": n} for n in manifest["outputs"]],
            "manifest": manifest, "seal": hardened.seal_state}


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        target: Path = typer.Argument(..., help="A .hardened bundle or an ONNX file exported by harden."),
        recipe: bool = typer.Option(False, "--recipe", help="Print the recipe (TOML) that made it: "
                                                            "`harden instrument MODEL --recipe FILE --key KEY` makes it again."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Show methods, sites, outputs, thresholds, calibration figures and the key fingerprint (never the key)."""
        with errors_to_exit():
            if not target.is_file():
                raise HardenError(f"no file at {target}")
            info = _describe_onnx(target) if target.suffix == ".onnx" else _describe_bundle(target, seal_key)
            if recipe:
                from harden.instrumentation.recipe import to_toml

                made_by = info["manifest"].get("recipe")
                if made_by is None:
                    raise HardenError(f"{target} records no recipe (made by an older harden)")
                if json_out:
                    emit_json(made_by)
                else:
                    typer.echo(to_toml(made_by), nl=False)
                return
            if json_out:
                emit_json(info)
                return
            _print(info)


def _print(info: dict) -> None:
    from harden.detectors.calibration import describe

    m = info["manifest"]
    metrics = m.get("metrics", {})
    stdout.print(f"[bold]{info['file']}[/] ({info['kind']}, harden {m['packages']['harden']}, format {m['format']}, "
                 f"created {m['created']})", highlight=False)
    stdout.print(f"input {'x'.join(map(str, m['input']['shape']))} in {m['input']['range']}, "
                 f"{m['num_classes']} classes; data {m['data']['name']} (seed {m['data']['split'].get('seed')}, "
                 f"sizes {m['data']['split'].get('sizes')}); key fingerprint {m['key_fingerprint']}", highlight=False)
    table = Table(title="methods")
    for column in ("method", "sites", "detector", "threshold", "calib FPR", "test FPR"):
        table.add_column(column)
    for method in m["methods"]:
        name = method["name"]
        table.add_row(name, ", ".join(method["sites"]) or "-", "scikit-learn (ONNX)" if method["detector"] else "in graph",
                      f"{method['threshold']:.4g}",
                      f"{metrics.get('calibration_fpr_per_method', {}).get(name, float('nan')):.3f}",
                      f"{metrics.get('test_fpr_per_method', {}).get(name, float('nan')):.3f}")
    stdout.print(table)
    stdout.print(f"policy {m['policy']['text']} (alarm when {m['policy']['k']} of {m['policy']['methods']} alarm); "
                 f"FPR target {m['fpr_target']}: calibration {metrics.get('calibration_fpr', float('nan')):.3f}, "
                 f"test {metrics.get('test_fpr', float('nan')):.3f}; test accuracy {metrics.get('test_accuracy', float('nan')):.4f} "
                 f"(original {metrics.get('original_test_accuracy', float('nan')):.4f})", highlight=False)
    line = describe(metrics.get("calibration"), m["fpr_target"])
    if line:  # bundles from before the order-statistic rule have no metrics["calibration"]
        stdout.print(line, highlight=False)
    outputs = ", ".join(o["name"] for o in info["outputs"])
    stdout.print(f"outputs: {outputs}", highlight=False)
    seal = info.get("seal")
    if seal:
        stdout.print({"verified": "seal: verified with the given key",
                      "unverified": "seal: present, not checked (pass --seal-key or set HARDEN_SEAL_KEY)",
                      "none": "seal: none (the bundle reproduces its own reference outputs; nothing proves who made "
                              "it: docs/SECURITY.md)"}[seal], highlight=False)
