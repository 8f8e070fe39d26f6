"""``harden instrument``: add detectors (fine-tuning where a method needs it), calibrate, write a bundle."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, console, emit_json, errors_to_exit, progress_reporter, ranks, seal_option, stdout
from harden.cli.workers import WORKERS_HELP, relaunch


METHOD_HELP = ("Detection method, NAME or NAME:key=value,... (e.g. ctt-strict:eps=auto, safetynet:layers=all); "
               "repeat for several. `harden methods` lists the methods, `harden methods NAME` their options.")
# Built-in values of the settings a recipe or a flag may give (flags win over the recipe).
DEFAULTS = {"seed": 0, "fpr": 0.02, "fpr_confidence": 0.9, "policy": "any", "input_range": "0,1", "limit": None,
            "device": "cpu"}


def register(app: typer.Typer) -> None:
    @app.command("instrument")
    def instrument(
        ctx: typer.Context,
        model: Path = typer.Argument(..., help="model.pt2, or model.pt with --arch"),
        data: str = typer.Option(None, "--data", help="mnist, digits, x.npz, an image folder, or x.pt (or the recipe's)."),
        method: list[str] = typer.Option(None, "--method", "-m", help=METHOD_HELP),
        recipe: Path = typer.Option(None, "--recipe", help="A TOML recipe: data, fpr, policy, seed and every method's "
                                                           "options ([methods.NAME] tables); flags win over it."),
        output: Path = typer.Option(None, "--output", "-o", help="Bundle to write (default: MODEL's name + .hardened)."),
        arch: str = typer.Option(None, "--arch", help="package.module:factory building the model for a state_dict."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a whole pickled module (runs code from the file)."),
        key: str = typer.Option(None, "--key", envvar="HARDEN_KEY", show_envvar=True, help="Secret key seeding masks and randomisation (default: a fresh random key, printed once)."),
        seed: int = typer.Option(None, "--seed", help="Seed of the data split and of training [default: 0]."),
        fpr: float = typer.Option(None, "--fpr", help="Target false-positive rate of the combined alarm on new clean data (see --fpr-confidence) [default: 0.02]."),
        fpr_confidence: float = typer.Option(None, "--fpr-confidence", help="Probability that the alarm's true false-positive rate on new data is at most --fpr (needs a large enough calibration split: 114 inputs for --fpr 0.02 at 0.9); 0 = the plain empirical quantile of the calibration split, no promise [default: 0.9]."),
        policy: str = typer.Option(None, "--policy", help="any | majority | k:N methods must alarm [default: any]."),
        input_range: str = typer.Option(None, "--input-range", help="The model's input range lo,hi [default: 0,1]."),
        limit: int = typer.Option(None, "--limit", help="Use only this many samples of the data (quick runs)."),
        device: str = typer.Option(None, "--device", help="cpu or cuda (training and bound propagation) [default: cpu]."),
        workers: int = typer.Option(None, "--workers", help=WORKERS_HELP),
        finetune: str = typer.Option(None, "--finetune", help="A fine-tuning objective applied to the classifier before the methods are fitted (or the recipe's finetune = ...): flow:delta=D[,kappa=,steps=,ramp=,lr=,batch_size=,check_every=,seed=] (certified training against flow fields of at most D pixels; see docs/results/flow.md)."),
        seal_key: str = seal_option(),
        json_out: bool = JSON_OPTION,
    ):
        """Instrument MODEL with the chosen methods and write a .hardened bundle."""
        with errors_to_exit():
            from harden.errors import HardenError
            from harden.instrumentation.pipeline import instrument as run_instrument
            from harden.instrumentation.recipe import Recipe, load_recipe
            from harden.io.atomic import check_output_path
            from harden.bundle.archive import save_bundle
            from harden.io.data import load_data, parse_input_range
            from harden.io.model import load_model
            from harden.methods.base import Options

            from harden.bundle.seal import resolve_key
            from harden.core.arguments import check_limit
            from harden.detectors.policy import policy_k

            plan = (load_recipe(recipe) if recipe else Recipe()).with_methods(method or [])
            given = {"data": data, "seed": seed, "fpr": fpr, "fpr_confidence": fpr_confidence, "policy": policy,
                     "input_range": input_range, "limit": limit, "device": device, "finetune": finetune}
            settings = {**DEFAULTS, **plan.shared, **{k: v for k, v in given.items() if v is not None}}
            if not settings.get("data"):
                raise HardenError("give --data (or a recipe with data = ...)")
            if not plan.methods:
                raise HardenError("choose at least one --method (or a recipe with [methods.NAME] tables); "
                                  "`harden methods` lists them")
            specs = plan.specs()
            # every check that needs no model or data runs first: a typo costs nothing
            inputs = [model, recipe, *_input_files(settings["data"], specs)]
            out = check_output_path(output or Path(model.name).with_suffix(".hardened"), inputs=inputs)
            generated_key = key is None
            seal_key = resolve_key(seal_key)
            check_limit(settings["limit"])
            finetune = settings.get("finetune")
            if finetune:
                from harden.train.flow_objective import parse_objective

                parse_objective(finetune)   # a typo fails before the model loads
            bounds = settings["input_range"]
            bounds = parse_input_range(bounds if isinstance(bounds, str) else ",".join(map(str, bounds)))
            policy_k(str(settings["policy"]), len(specs))
            Options(key=key or "checked", seed=settings["seed"], fpr=settings["fpr"],
                    fpr_confidence=settings["fpr_confidence"], device=settings["device"],
                    trust_pickle=trust_pickle).check()   # before any rank starts
            if relaunch(ctx, workers):
                return
            with ranks(settings["device"]) as world:
                from harden.core.distributed import broadcast, rank_device

                key = key if key is not None else broadcast(secrets.token_hex(16))   # every rank needs the same key
                options = Options(key=key, seed=settings["seed"], fpr=settings["fpr"],
                                  fpr_confidence=settings["fpr_confidence"], device=rank_device(settings["device"]),
                                  trust_pickle=trust_pickle).check()
                net = load_model(model, arch, trust_pickle)
                dataset = load_data(settings["data"], seed=settings["seed"], input_range=bounds, limit=settings["limit"])
                with progress_reporter(not json_out) as progress:
                    hardened = run_instrument(net, dataset, specs, options, policy=settings["policy"], progress=progress,
                                              finetune=finetune)
                    progress("writing bundle", 1.0)
                    manifest = save_bundle(hardened, out, seal_key=seal_key, inputs=inputs)
                if json_out:
                    emit_json({"bundle": str(out), "manifest": manifest})
                    return
                if generated_key and world.writer:
                    console.print(f"key (keep it secret; needed to re-instrument identically): {key}", highlight=False)
                _print_summary(out, manifest)


def _input_files(data, specs) -> list[Path]:
    """The files a run reads besides the model and the recipe: its data and any model a method loads."""
    files = [Path(data)] if isinstance(data, str) and Path(data).exists() else []
    for spec in specs:
        second = spec.settings.to_dict().get("second_model")
        if second:
            files.append(Path(second))
    return files


def _print_abstain_finetuning(method: dict) -> None:
    """The abstain fine-tuning history (harden.train.abstain), one row per calibration check; the kept one marked."""
    history = method["config"].get("_history")
    finetune = method["config"].get("finetune", {})
    kept = finetune.get("kept_check")
    table = Table(title=f"{method['name']} fine-tuning (calibration split: accuracy, alarm FPR at the calibrated t, "
                        f"certified at eps {finetune.get('eps')})")
    for column in ("step", "eps", "natural CE", "certificate loss", "cal acc", "t", "cal FPR", "robust",
                   "detect-or-robust", "s"):
        table.add_column(column, justify="right")
    for i, r in enumerate(history, 1):
        table.add_row(f"{r['step']}{'*' if i == kept else ''}", f"{r['eps']:.3g}", f"{r['natural']:.3f}",
                      f"{r['certificate']:.3g}", f"{r['accuracy']:.3f}", f"{r['threshold']:.3g}", f"{r['fpr']:.3f}",
                      f"{r['robust']:.3f}", f"{r['detect_or_robust']:.3f}", f"{r['seconds']:.1f}")
    stdout.print(table)
    if kept == 0:
        stdout.print("no check stayed within the accuracy drop of the original model: the original weights are kept",
                     highlight=False)
    else:
        stdout.print(f"* kept check {kept} (step {finetune.get('kept_step')}): the most certified detect-or-robust "
                     "among checks within the accuracy drop of the original model", highlight=False)


def _print_finetuning(method: dict) -> None:
    """The fine-tuning history, one row per calibration check; the kept check is marked (rule:
    harden.train.finetune._better); then why training stopped."""
    history = method["config"].get("_history")
    if not history:
        return
    if method["name"] in HISTORY_PRINTERS:
        return HISTORY_PRINTERS[method["name"]](method)
    finetune = method["config"].get("finetune", {})
    best = finetune.get("best_epoch")
    table = Table(title=f"{method['name']} fine-tuning (calibration split: accuracy, trap FPR before calibration, "
                        f"L_D at T, L_C at the exported thresholds)")
    for column in ("step", "alpha", "CE", "L_D", "L_C", "cal acc", "cal FPR", "cal L_D", "cal L_C", "s"):
        table.add_column(column, justify="right")
    for r in history:   # one row per calibration check, labelled by the steps taken
        mark = "*" if r["epoch"] == best else ""
        table.add_row(f"{r.get('step', r['epoch'])}{mark}", f"{r['alpha']:.3g}", f"{r['cross_entropy']:.3f}",
                      f"{r['l_d']:.3g}", f"{r['l_c']:.3g}", f"{r['accuracy']:.3f}", f"{r['fpr']:.3f}",
                      f"{r['cal_l_d']:.3g}", f"{r['cal_l_c']:.3g}", f"{r['seconds']:.1f}")
    stdout.print(table)
    reason = {"converged": f"converged (cal L_C at T not 1% better for {finetune.get('patience')} checks)",
              "step budget": f"step budget ({finetune.get('steps')} steps)",
              "epochs": f"--epochs {finetune.get('epochs')}"}.get(finetune.get("stop_reason"))
    if reason:
        stdout.print(f"stopped after {finetune.get('steps_taken')} steps: {reason}", highlight=False)
    if best == 0:
        stdout.print("no check stayed within 1 point of the original model's calibration accuracy: the original "
                     "weights are kept (the traps keep their natural thresholds)", highlight=False)
    stdout.print(f"* kept check {best} (step {finetune.get('best_step', '-')}): among checks with calibration accuracy within 1 point of the original model, "
                 "the lowest cal L_C of those with cal FPR <= --fpr, else the lowest cal FPR + cal L_C "
                 "(no check that accurate: the most accurate check)", highlight=False)


HISTORY_PRINTERS = {"abstain": _print_abstain_finetuning}
"""Methods whose fine-tuning history is not CTT's, by name (CTT's table is the default)."""


def _print_eps_search(method: dict) -> None:
    """--eps auto: one row per grid eps; the chosen one is marked (rule: harden.train.eps_search.choose)."""
    search = method["config"].get("eps_search")
    if not search:
        return
    table = Table(title=f"{method['name']} --eps auto ({search['attack']} on half the calibration split, alarm "
                        f"calibrated on the other half)")
    for column in ("eps", "cal acc", "detected", "of", "alarm rate", "steps", "stop", "s"):
        table.add_column(column, justify="right")
    for c in search["candidates"]:
        mark = "*" if c["eps"] == search["eps"] else ""
        table.add_row(f"{c['eps']:.3g}{mark}", f"{c['accuracy']:.3f}", f"{c['detection']:.3f}", str(c["adversarial"]),
                      f"{c['alarm_fpr']:.3f}", str(c["steps"]), c["stop"], f"{c['seconds']:.1f}")
    stdout.print(table)
    stdout.print(f"* chosen eps {search['eps']:.3g}: the highest FGSM detection among eps whose calibration accuracy "
                 f"is within 1 point of the original model's ({search['baseline_accuracy']:.3f}); ties: the larger "
                 "eps (none that accurate: the most accurate)", highlight=False)


def _print_objective(facts: dict | None) -> None:
    """--finetune: one row per calibration check; the kept one is marked."""
    if not facts:
        return
    table = Table(title=f"--finetune {facts['objective']} (calibration split: clean accuracy, certified by interval "
                        f"bounds at delta {facts['settings']['delta']:g})")
    for column in ("step", "delta", "kappa", "loss", "cal acc", "certified", "certified & correct", "s"):
        table.add_column(column, justify="right")
    for r in facts["history"]:
        mark = "*" if r["step"] == facts["kept_step"] else ""
        table.add_row(f"{r['step']}{mark}", f"{r['delta']:.3g}", f"{r['kappa']:.3g}",
                      "-" if r["loss"] is None else f"{r['loss']:.3f}", f"{r['accuracy']:.3f}",
                      f"{r['certified']:.3f}", f"{r['certified_correct']:.3f}", f"{r['seconds']:.1f}")
    stdout.print(table)
    stdout.print("* kept check: the most calibration inputs certified and correct (ties: the more accurate)",
                 highlight=False)


def _print_summary(out: Path, manifest: dict) -> None:
    from harden.detectors.calibration import describe

    _print_objective(manifest.get("finetune"))
    for m in manifest["methods"]:
        _print_eps_search(m)
        _print_finetuning(m)
    metrics = manifest["metrics"]
    table = Table(title=f"wrote {out}")
    for column in ("method", "sites", "threshold", "calib FPR", "test FPR"):
        table.add_column(column)
    for m in manifest["methods"]:
        table.add_row(m["name"], ", ".join(m["sites"]) or "-", f"{m['threshold']:.4g}",
                      f"{metrics['calibration_fpr_per_method'][m['name']]:.3f}",
                      f"{metrics['test_fpr_per_method'][m['name']]:.3f}")
    stdout.print(table)
    stdout.print(
        f"combined alarm ({manifest['policy']['text']}): calibration FPR {metrics['calibration_fpr']:.3f} "
        f"(target {manifest['fpr_target']}), test FPR {metrics['test_fpr']:.3f}; test accuracy "
        f"{metrics['test_accuracy']:.4f} (original {metrics['original_test_accuracy']:.4f}); "
        f"key fingerprint {manifest['key_fingerprint']}",
        highlight=False,
    )
    line = describe(metrics.get("calibration"), manifest["fpr_target"])
    if line:
        stdout.print(line, highlight=False)
