"""``harden export``: one ONNX graph (classifier + detectors + alarm), checked against the Python side."""

from __future__ import annotations

from pathlib import Path

import typer

from harden.export.parity import RELATIVE_TOLERANCE
from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, progress_reporter, seal_option, stdout


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        bundle: Path = typer.Argument(..., help="A .hardened bundle from `harden instrument`."),
        output: Path = typer.Option(None, "--output", "-o", help="ONNX file to write (default: BUNDLE's name + .onnx)."),
        target: str = typer.Option("default", "--target", help="default | portable: float32 throughout (no float64 blocks, for edge runtimes and converters), parity re-checked."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Export BUNDLE to ONNX; onnxruntime must match torch + scikit-learn on held-out data or nothing is written."""
        with errors_to_exit():
            from harden.export import export_onnx
            from harden.io.atomic import check_output_path
            from harden.bundle.archive import load_bundle

            out = check_output_path(output or bundle.with_suffix(".onnx"), inputs=[bundle])
            with progress_reporter(not json_out) as progress:
                progress("loading bundle", 0.1)
                hardened, manifest = load_bundle(bundle, seal_key=seal_key)
                progress("exporting and checking parity", 0.4)
                result = export_onnx(hardened, out, source=bundle, target=target)
            outputs = [o.name for o in result.model.graph.output]
            if json_out:
                emit_json({"onnx": str(out), "target": target, "outputs": outputs, "parity": result.parity.to_json(),
                           "bundle_round_trip": result.torch_parity.to_json(), "size_bytes": out.stat().st_size})
                return
            worst = result.parity.max_abs_diff
            ties = sum(result.parity.threshold_ties.values())
            share = result.parity.worst_ratio()
            stdout.print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB{', float32 throughout' if target == 'portable' else ''}), "
                         f"outputs: {', '.join(outputs)}", highlight=False)
            stdout.print(
                f"parity on {result.parity.samples} held-out inputs: max difference {worst:.2e}, at most "
                f"{share:.0%} of its tolerance ({RELATIVE_TOLERANCE:g} of each output's magnitude), alarms identical "
                f"({ties} float tie(s) at a threshold)", highlight=False)
