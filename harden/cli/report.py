"""``harden report``: one self-contained HTML file with every figure a reader looks at first."""

from __future__ import annotations

from pathlib import Path

import typer

from harden.cli.common import JSON_OPTION, emit_json, errors_to_exit, progress_reporter, seal_option, stdout
from harden.report.settings import CERTIFY_FRACTIONS, STRENGTH_FRACTIONS, ReportSettings

DEFAULTS = ReportSettings()


def _grid(fractions) -> str:
    return " ".join(f"{f:g}" for f in fractions)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        target: Path = typer.Argument(..., help="A .hardened bundle, or an ONNX file exported from one (its bundle "
                                                "beside it or --bundle)."),
        output: Path = typer.Option(..., "--output", "-o", help="The HTML file to write."),
        bundle: Path = typer.Option(None, "--bundle", help="The bundle TARGET was exported from."),
        data: str = typer.Option(None, "--data", help="Data (default: the bundle's, split as it was)."),
        split: str = typer.Option(DEFAULTS.split, "--split", help="train | calibration | test: the inputs attacked, "
                                                          "certified and timed."),
        limit: int = typer.Option(DEFAULTS.limit, "--limit", help="Attack at most this many inputs of the split."),
        seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed of the attacks and of the certificates' sampling."),
        attack: list[str] = typer.Option(None, "--attack", "-a",
                                         help=f"An attack of the ROC section, name:param=value,... as in harden "
                                              f"evaluate; repeatable (default: {' '.join(DEFAULTS.attacks)})."),
        strength_attack: list[str] = typer.Option(None, "--strength-attack",
                                                  help="An attack run at every --strength-eps (name[:param=value,...] "
                                                       f"without eps); repeatable (default: {' '.join(DEFAULTS.strength_attacks)})."),
        strength_eps: list[float] = typer.Option(None, "--strength-eps",
                                                 help="An eps of the strength section, in input units; repeatable "
                                                      f"(default: {_grid(STRENGTH_FRACTIONS)} x the input range's width)."),
        certify_eps: list[float] = typer.Option(None, "--certify-eps",
                                                help="A box radius of the certificates, in input units; repeatable "
                                                     f"(default: {_grid(CERTIFY_FRACTIONS)} x the input range's width, "
                                                     "and the bundle's eps)."),
        certify_limit: int = typer.Option(DEFAULTS.certify_limit, "--certify-limit", help="Certify at most this many inputs per eps."),
        bounds: str = typer.Option(DEFAULTS.bounds, "--bounds", help="ibp | crown-ibp | crown, as in harden certify."),
        latency_threads: int = typer.Option(DEFAULTS.latency_threads, "--latency-threads", help="onnxruntime threads of both graphs timed."),
        latency_rounds: int = typer.Option(DEFAULTS.latency_rounds, "--latency-rounds",
                                           help="Timed calls at batch 1 (a quarter, at least 20, at batch 256)."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Method summary, calibration, ROC curves, detection against attack strength, certified fraction against
        eps, CTT placement and latency, in ONE self-contained HTML file (figures inline)."""
        with errors_to_exit():
            from harden.api import make_report
            from harden.bundle.archive import load_bundle
            from harden.cli.evaluate import resolve_target
            from harden.io.atomic import check_output_path
            from harden.report.settings import ReportSettings, plan

            check_output_path(output)
            settings = ReportSettings(
                **({"attacks": tuple(attack)} if attack else {}),
                **({"strength_attacks": tuple(strength_attack)} if strength_attack else {}),
                strength_eps=tuple(strength_eps or ()), certify_eps=tuple(certify_eps or ()),
                certify_limit=certify_limit, bounds=bounds, data=data, split=split, limit=limit, seed=seed,
                latency_threads=latency_threads, latency_rounds=latency_rounds)
            bundle_path, onnx_path = resolve_target(target, bundle)
            hardened, manifest = load_bundle(bundle_path, seal_key=seal_key)
            plan(settings, manifest)   # every setting checked before minutes of attacks
            with progress_reporter(not json_out) as progress:
                figures = make_report(hardened, manifest, output, settings, onnx_path=onnx_path, target=target,
                                      progress=progress)
            if json_out:
                emit_json({"output": str(output), **figures})
                return
            _print(figures, output, output.stat().st_size)


def _print(figures: dict, output: Path, size: int) -> None:
    from harden.report.html import pct

    ev = figures["evaluation"]
    cal = figures["calibration"]
    combined = cal["rows"][-1]
    stdout.print(f"wrote {output} ({size / 1024:.0f} KiB)", highlight=False)
    stdout.print(f"calibration FPR {pct(combined['calibration_fpr'])}, test FPR {pct(combined['test_fpr'])} "
                 f"(target {pct(cal['fpr_target'])}); {ev['n_clean']} inputs attacked by "
                 f"{len(ev['rows'])} attack(s)", highlight=False)
    cert = figures["certification"]
    if "skipped" in cert:
        stdout.print(f"certificates: not available: {cert['skipped']}", highlight=False)
    lat = figures["latency"]
    stdout.print(f"latency ratio (hardened / plain, batch {list(lat['batches'])[-1]}): {lat['ratio']:.2f}",
                 highlight=False)
