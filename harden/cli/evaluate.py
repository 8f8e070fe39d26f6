"""``harden evaluate``: real attacks against the classifier, detectors scored through the exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import typer

from harden.attacks.defaults import DEFAULT_ATTACKS
from harden.cli.attacks import ATTACK_NAMES
from harden.core.progress import part
from harden.cli.common import JSON_OPTION, check_plot_path, console, emit_json, errors_to_exit, progress_reporter, seal_option, stdout
from harden.errors import HardenError


def resolve_target(target: Path, bundle: Path | None) -> tuple[Path, Path | None]:
    """(bundle, onnx): an ONNX target needs its bundle for the white-box attacks' gradients.

    The bundle is the one the user names (--bundle), else the file of the same name beside the ONNX
    (``lenet.onnx`` -> ``lenet.hardened``).  A name stored inside the ONNX file is never followed: the file
    may come from someone else; it only helps the error message.
    """
    if not target.is_file():
        raise HardenError(f"no file at {target}")
    if target.suffix != ".onnx":
        return target, None
    if bundle is None:
        candidate = target.with_suffix(".hardened")
        if not candidate.is_file():
            from harden.export.runtime import OnnxGraph

            stored = OnnxGraph(target).metadata.get("harden.bundle")
            hint = f" (the ONNX says it came from {stored!r:.80})" if stored else ""
            raise HardenError(f"white-box attacks need the classifier's gradients: pass --bundle, the .hardened "
                              f"{target.name} was exported from{hint}; harden does not follow names stored in a file")
        bundle = candidate
    return bundle, target


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        target: Path = typer.Argument(..., help="An exported ONNX file (its bundle beside it or --bundle) or a .hardened bundle."),
        attack: list[str] = typer.Option(None, "--attack", "-a", help=f"NAME or NAME:param=value,..., repeatable: {', '.join(ATTACK_NAMES)} (`harden attacks NAME` lists its parameters; default: {' '.join(DEFAULT_ATTACKS)})."),
        bundle: Path = typer.Option(None, "--bundle", help="The bundle TARGET was exported from."),
        data: str = typer.Option(None, "--data", help="Data to attack (default: the bundle's, split as it was)."),
        split: str = typer.Option("test", "--split", help="The bundle's data split to attack: test, calibration or train."),
        limit: int = typer.Option(500, "--limit", help="Attack at most this many inputs of the split."),
        seed: int = typer.Option(0, "--seed", help="Seed of the attacks' randomness (random starts, targets, noise)."),
        adaptive: bool = typer.Option(False, "--adaptive", help="Type II attack that knows the detectors (smoothed surrogates); alone unless --attack is given too."),
        adaptive_eps: float = typer.Option(0.1, "--adaptive-eps", help="Budget of the --adaptive attack, in the --adaptive-norm."),
        adaptive_norm: str = typer.Option("linf", "--adaptive-norm", help="linf or l2."),
        adaptive_steps: int = typer.Option(100, "--adaptive-steps", help="PGD steps per restart."),
        adaptive_attacker: list[str] = typer.Option(None, "--adaptive-attacker", help="key-known and/or key-unknown, repeatable (default: both; a key-unknown row this bundle cannot have is reported as skipped)."),
        adaptive_proxy: Path = typer.Option(None, "--adaptive-proxy", help="The same classifier hardened with another key: the key-unknown attacker attacks its detectors."),
        adversarial: list[Path] = typer.Option(None, "--adversarial", help="An .npz of adversarial inputs crafted elsewhere (x, y, optional x_clean), scored as given; repeatable; alone unless --attack is given too."),
        plot: Path = typer.Option(None, "--plot", help="Also draw a PNG: every attack's ROC curves, and detection "
                                                       "against eps for an attack run at several eps (as harden report)."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Accuracy under attack, detection rate, perturbation size, clean FPR and ROC-AUC per detector."""
        with errors_to_exit():
            from harden.api import check_evaluate_arguments, evaluate as run_evaluate, evaluate_adaptive
            from harden.evaluation.evaluate import render_table
            from harden.bundle.archive import load_bundle

            check_evaluate_arguments(split, limit, adaptive_eps=adaptive_eps, adaptive_norm=adaptive_norm,
                                     adaptive_steps=adaptive_steps, attackers=adaptive_attacker)
            if plot is not None:
                check_plot_path(plot)
                if adaptive and not (attack or adversarial):
                    raise HardenError("--plot draws the attacks' ROC curves; --adaptive alone has none "
                                      "(add --attack or --adversarial)")
            bundle_path, onnx_path = resolve_target(target, bundle)
            hardened, manifest = load_bundle(bundle_path, seal_key=seal_key)
            report, adaptive_report = None, None
            with progress_reporter(not json_out) as progress:
                plain = bool(attack or adversarial or not adaptive)
                split_at = 0.5 if plain and adaptive else 1.0
                if plain:
                    attacks = attack or ([] if adversarial or adaptive else list(DEFAULT_ATTACKS))
                    report = run_evaluate(hardened, manifest, attacks, onnx_path=onnx_path, data=data,
                                          split=split, limit=limit, seed=seed, progress=part(progress, 0.0, split_at),
                                          adversarial=adversarial or [])
                if adaptive:
                    adaptive_report = evaluate_adaptive(
                        hardened, manifest, eps=adaptive_eps, norm=adaptive_norm, steps=adaptive_steps,
                        onnx_path=onnx_path, data=data, split=split, limit=limit,
                        attackers=tuple(adaptive_attacker) if adaptive_attacker else None, proxy=adaptive_proxy,
                        progress=part(progress, split_at if plain else 0.0, 1.0), seal_key=seal_key)
            if plot is not None:
                _plot(report, manifest, plot)
            if json_out:
                extra = {"adaptive": adaptive_report} if adaptive_report is not None else {}
                emit_json({"target": str(target), "bundle": str(bundle_path), **(report.to_dict() if report else {}), **extra})
                return
            if report is not None:
                stdout.print(render_table(report))
            if adaptive_report is not None:
                from harden.evaluation.adaptive import render_adaptive

                stdout.print(render_adaptive(adaptive_report))
            if onnx_path is None:
                console.print("scored through a fresh in-memory ONNX export of the bundle", highlight=False)
            if plot is not None:
                console.print(f"wrote {plot}", highlight=False)


def _plot(report, manifest: dict, path: Path) -> None:
    from harden.report.plots import evaluation_figure, write_png
    from harden.report.series import strength_series

    evaluation = report.to_dict(curves=True)
    write_png(evaluation_figure(evaluation, strength_series(evaluation["rows"]), manifest["policy"]["text"]), path)
