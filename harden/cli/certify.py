"""``harden certify``: what bound propagation (interval or linear relaxation) guarantees about a bundle's graph."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, check_plot_path, emit_json, errors_to_exit, progress_reporter, seal_option, stdout


def register(app: typer.Typer) -> None:
    @app.command("certify")
    def certify(
        bundle: Path = typer.Argument(..., help="A .hardened bundle."),
        eps: list[float] = typer.Option(None, "--eps", help="L-inf radius; repeat for several (default: the bundle's eps)."),
        data: str = typer.Option(None, "--data", help="Data (default: the bundle's, split as it was)."),
        split: str = typer.Option("test", "--split", help="train | calibration | test"),
        limit: int = typer.Option(None, "--limit", help="Certify at most this many samples."),
        check: int = typer.Option(0, "--check", help="Draw N points per box through the real model; any contradiction fails."),
        seed: int = typer.Option(0, "--seed", help="Seed of the points --check draws."),
        bounds: str = typer.Option("ibp", "--bounds",
                                   help="ibp | crown-ibp | crown: interval bounds, or backward linear relaxation "
                                        "with intermediate bounds from intervals (crown-ibp) or from backward passes (crown)."),
        plot: Path = typer.Option(None, "--plot", help="Also draw a PNG: certified fraction against eps, robust and "
                                                       "detect-or-robust, hardened and original (as harden report)."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Placement of every CTT trap, per-sample robust and detect-or-robust certificates, hardened vs original."""
        with errors_to_exit():
            from harden.api import certify as certificates, check_certify_arguments
            from harden.bounds.crown import check_method
            from harden.bundle.archive import load_bundle

            check_method(bounds)  # before the bundle loads: a typo fails at once
            if plot is not None:
                check_plot_path(plot)
            check_certify_arguments(eps, split, limit, check)
            hardened, manifest = load_bundle(bundle, seal_key=seal_key)
            with progress_reporter(not json_out) as progress:
                report = certificates(hardened, manifest, eps or None, data=data, split=split, limit=limit,
                                      check=check, seed=seed, bounds=bounds, progress=progress)
            if plot is not None:
                from harden.report.plots import certified_figure, write_png

                write_png(certified_figure(report), plot)
            if json_out:
                emit_json(report)
            else:
                _print(report)
                if plot is not None:
                    stdout.print(f"wrote {plot}", highlight=False)
            if report.get("check") and any(c["violations"] for c in report["check"].values()):
                raise typer.Exit(1)


def _print(report: dict) -> None:
    stdout.print(f"{report['samples']} {report['split']} samples; CTT alarm thresholds as exported "
                 f"(policy {report['policy']}); bounds: {report['bounds']}", highlight=False)
    if report.get("interval_only"):
        stdout.print(f"note: no linear relaxation for {', '.join(report['interval_only'])}: the backward passes "
                     "use those nodes' interval bounds (sound, looser)", highlight=False)
    for eps_text, result in report["results"].items():
        table = Table(title=f"eps = {eps_text}: placement of masked neurons (fraction of samples x neurons)")
        for column in ("site", "neurons", "natural <= T", "hi >= T (sub-optimal)", "lo >= T (optimal)"):
            table.add_column(column)
        for row in result["placement"]:
            table.add_row(row["site"], str(row["neurons"]), f"{row['natural_below']:.4f}",
                          f"{row['upper_reaches']:.4f}", f"{row['lower_reaches']:.4f}")
        if result["placement"]:
            stdout.print(table)
        certs = Table(title=f"eps = {eps_text}: per-sample certificates")
        for column in ("model", "robust", "detect-or-robust", "always alarms"):
            certs.add_column(column)
        for name in ("hardened", "original"):
            c = result[name]
            certs.add_row(name, f"{c['robust']:.4f}", f"{c['detect_or_robust']:.4f}", f"{c['always_alarm']:.4f}")
        stdout.print(certs)
    for eps_text, check in (report.get("check") or {}).items():
        verdict = "[green]no contradiction[/]" if not check["violations"] else f"[bold red]{check['violations']} contradiction(s)[/]"
        stdout.print(f"--check at eps {eps_text}: {check['points']} points through the real model: {verdict}")
        for line in check.get("examples", [])[:5]:
            stdout.print(f"  {line}", highlight=False)
