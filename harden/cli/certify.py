"""``harden certify``: what bound propagation (interval or linear relaxation) guarantees about a bundle's graph."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, check_plot_path, emit_json, errors_to_exit, progress_reporter, ranks, seal_option, stdout
from harden.cli.workers import WORKERS_HELP, relaunch


def register(app: typer.Typer) -> None:
    @app.command("certify")
    def certify(
        ctx: typer.Context,
        bundle: Path = typer.Argument(..., help="A .hardened bundle."),
        eps: list[float] = typer.Option(None, "--eps", help="L-inf radius; repeat for several (default: the bundle's eps)."),
        data: str = typer.Option(None, "--data", help="Data (default: the bundle's, split as it was)."),
        split: str = typer.Option("test", "--split", help="train | calibration | test"),
        limit: int = typer.Option(None, "--limit", help="Certify at most this many samples."),
        check: int = typer.Option(0, "--check", help="Draw N points per box through the real model; any contradiction fails."),
        seed: int = typer.Option(0, "--seed", help="Seed of the points --check draws."),
        bounds: str = typer.Option("ibp", "--bounds",
                                   help="ibp | crown-ibp | crown | sdp: interval bounds, or backward linear relaxation "
                                        "with intermediate bounds from intervals (crown-ibp) or from backward passes (crown), "
                                        "or (two-layer networks only) the thesis's semidefinite certificate, solved with SCS."),
        threat: list[str] = typer.Option(None, "--threat",
                                         help="linf (the L-inf box of --eps; the default) or flow:delta=D[,tv=T]: every "
                                              "pixel moved by its own flow, each component <= D pixels, total variation "
                                              "(Eq. 6) <= T; repeatable."),
        plot: Path = typer.Option(None, "--plot", help="Also draw a PNG: certified fraction against eps, robust and "
                                                       "detect-or-robust, hardened and original (as harden report); "
                                                       "with flow threats only, against their delta."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (bound propagation and the --check points)."),
        batch_size: int = typer.Option(256, "--batch-size", help="Samples bounded at once (memory), the unit split across --workers."),
        workers: int = typer.Option(None, "--workers", help=WORKERS_HELP),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Placement of every CTT trap, per-sample robust and detect-or-robust certificates, hardened vs original."""
        with errors_to_exit():
            from harden.api import certify as certificates, check_certify_arguments
            from harden.bundle.archive import load_bundle
            from harden.certification.certify import check_bound_method
            from harden.certification.flow import parse_threat

            check_bound_method(bounds)  # before the bundle loads (and before ranks start): a typo fails at once
            for text in threat or []:
                parse_threat(text)
            if plot is not None:
                check_plot_path(plot)
            check_certify_arguments(eps, split, limit, check)
            if relaunch(ctx, workers):
                return
            with ranks(device) as world:
                from harden.core.distributed import rank_device

                hardened, manifest = load_bundle(bundle, seal_key=seal_key)
                with progress_reporter(not json_out) as progress:
                    report = certificates(hardened, manifest, eps or None, data=data, split=split, limit=limit,
                                          check=check, seed=seed, bounds=bounds, threats=threat or None,
                                          progress=progress, device=rank_device(device), batch_size=batch_size)
                if plot is not None:   # every rank takes part in the write; rank 0 alone keeps the file
                    from harden.report.plots import certified_figure, write_png

                    write_png(certified_figure(report), plot)
                if json_out:
                    emit_json(report)
                else:
                    _print(report)
                    if plot is not None:
                        stdout.print(f"wrote {plot}", highlight=False)
                # rank 0 alone: under --workers the launcher passes its exit code on
                if world.writer and report.get("check") and any(c["violations"] for c in report["check"].values()):
                    raise typer.Exit(1)


def _print(report: dict) -> None:
    stdout.print(f"{report['samples']} {report['split']} samples; CTT alarm thresholds as exported "
                 f"(policy {report['policy']}); bounds: {report['bounds']}", highlight=False)
    for a in report.get("abstain", []):
        stdout.print(f"abstain detector on {a['node']!r}: detect-or-robust when, for every wrong class j, the label "
                     f"or the abstain score - {a['threshold']:.4g} beats j over the whole box", highlight=False)
    if report.get("interval_only"):
        stdout.print(f"note: no linear relaxation for {', '.join(report['interval_only'])}: the backward passes "
                     "use those nodes' interval bounds (sound, looser)", highlight=False)
    for eps_text, result in report["results"].items():
        where = _where(eps_text)
        table = Table(title=f"{where}: placement of masked neurons (fraction of samples x neurons)")
        for column in ("site", "neurons", "natural <= T", "hi >= T (sub-optimal)", "lo >= T (optimal)"):
            table.add_column(column)
        for row in result["placement"]:
            table.add_row(row["site"], str(row["neurons"]), f"{row['natural_below']:.4f}",
                          f"{row['upper_reaches']:.4f}", f"{row['lower_reaches']:.4f}")
        if result["placement"]:
            stdout.print(table)
        certs = Table(title=f"{where}: per-sample certificates")
        for column in ("model", "robust", "detect-or-robust", "always alarms"):
            certs.add_column(column)
        for name in ("hardened", "original"):
            c = result[name]
            certs.add_row(name, f"{c['robust']:.4f}", f"{c['detect_or_robust']:.4f}", f"{c['always_alarm']:.4f}")
        stdout.print(certs)
    for eps_text, check in (report.get("check") or {}).items():
        verdict = "[green]no contradiction[/]" if not check["violations"] else f"[bold red]{check['violations']} contradiction(s)[/]"
        stdout.print(f"--check at {_where(eps_text)}: {check['points']} points through the real model: {verdict}")
        for line in check.get("examples", [])[:5]:
            stdout.print(f"  {line}", highlight=False)


def _where(key: str) -> str:
    """A results key as a title: ``eps = 0.1`` for an L-inf box, the flow threat's label as it is."""
    return key if key.startswith("flow") else f"eps = {key}"
