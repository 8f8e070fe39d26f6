"""``harden instrument``: add detectors (fine-tuning where a method needs it), calibrate, write a bundle."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer
from rich.table import Table

from harden.cli.common import JSON_OPTION, console, emit_json, errors_to_exit, progress_reporter, stdout


def register(app: typer.Typer) -> None:
    @app.command("instrument")
    def instrument(
        model: Path = typer.Argument(..., help="model.pt2, or model.pt with --arch"),
        data: str = typer.Option(..., "--data", help="mnist, digits, x.npz, an image folder, or x.pt"),
        method: list[str] = typer.Option(..., "--method", "-m", help="Detection method; repeat for several (ctt-lite, ...)."),
        output: Path = typer.Option(None, "--output", "-o", help="Bundle to write (default: MODEL's name + .hardened)."),
        arch: str = typer.Option(None, "--arch", help="package.module:factory building the model for a state_dict"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a whole pickled module (runs code from the file)."),
        key: str = typer.Option(None, "--key", help="Secret key seeding masks and randomisation (default: a fresh random key, printed once)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data split and of training."),
        layers: list[str] = typer.Option(None, "--layers", help="all | last:K | name,name, or METHOD=SPEC for one method; repeatable (default: each method's own)."),
        mask_ratio: float = typer.Option(0.01, "--mask-ratio", help="CTT: fraction of each site's neurons that are traps (at least one)."),
        quantile: float = typer.Option(1.0, "--quantile", help="ctt-lite: per-neuron threshold quantile on the training split (1 = maximum)."),
        fpr: float = typer.Option(0.02, "--fpr", help="Target false-positive rate of the combined alarm on new clean data (see --fpr-confidence)."),
        fpr_confidence: float = typer.Option(0.9, "--fpr-confidence", help="Probability that the alarm's true false-positive rate on new data is at most --fpr (needs a large enough calibration split: 114 inputs for --fpr 0.02 at 0.9); 0 = the plain empirical quantile of the calibration split (the old behaviour, no promise)."),
        policy: str = typer.Option("any", "--policy", help="any | majority | k:N methods must alarm."),
        input_range: str = typer.Option("0,1", "--input-range", help="The model's input range lo,hi."),
        limit: int = typer.Option(None, "--limit", help="Use only this many samples of the data (quick runs)."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (training and bound propagation)."),
        eps: str = typer.Option("scaled", "--eps", help="CTT-loose/strict: L-inf radius of the certified box used in fine-tuning (input units); scaled (default: 0.02 x the FGSM eps that halves the model's calibration accuracy, the paper's 3e-3 on MNIST, 1e-4 on CIFAR); or auto (the paper's grid search: FGSM detection and accuracy on the calibration split; see harden.train.eps_search)."),
        threshold: float = typer.Option(1e-4, "--threshold", help="CTT-loose/strict: trap threshold T."),
        epochs: int = typer.Option(None, "--epochs", help="CTT-loose/strict: exactly this many fine-tuning epochs, no early stop (instead of --steps)."),
        steps: int = typer.Option(None, "--steps", help="CTT-loose/strict: fine-tuning step budget (default 600); stops earlier once the calibration L_C converges (--patience)."),
        patience: int = typer.Option(None, "--patience", help="CTT-loose/strict: stop after this many calibration checks without a 1% better L_C (default 3; 0: train the whole --steps)."),
        alpha: float = typer.Option(None, "--alpha", help="CTT: weight of L_C (L_D's is alpha x --detection-weight)."),
        alpha_growth: float = typer.Option(None, "--alpha-growth", help="CTT: alpha is multiplied by this every --alpha-every epochs."),
        alpha_every: int = typer.Option(None, "--alpha-every", help="CTT: epochs between alpha increases."),
        lr: float = typer.Option(None, "--lr", help="Fine-tuning learning rate (RMSProp, no weight decay; default 3e-4)."),
        detection_weight: float = typer.Option(None, "--detection-weight", help="CTT: weight of L_D relative to L_C."),
        fire_margin: float = typer.Option(None, "--fire-margin", help="CTT: L_C asks the certified bound to clear T + this (0: the paper)."),
        trap_rule: str = typer.Option(None, "--trap-rule", help="CTT-loose/strict exported trap thresholds: fixed (T) | natural (max(T, natural maximum on the training split))."),
        trap_scale: str = typer.Option(None, "--trap-scale", help="CTT-loose/strict: std (the calibrated shift moves each trap by its natural spread; default) | none (one shift for all)."),
        anneal: str = typer.Option(None, "--anneal", help="CTT: what alpha's growth applies to: detection (L_D only, after L_C; default) | both."),
        trap_placement: str = typer.Option(None, "--trap-placement", help="CTT: uniform (keyed traps anywhere; default) | quiet (only positions constant on the training split: catches DeepFool, but alarms on slightly noisy inputs)."),
        objective: str = typer.Option(None, "--objective", help="CTT-loose/strict fine-tuning objective: ctt (the paper's L_D + L_C; default) | detect-or-robust (the certificate harden certify reports: every input of the eps-box keeps its label or alarms) | robust (certified robustness alone, traps ignored: the baseline)."),
        cert_margin: float = typer.Option(None, "--cert-margin", help="CTT detect-or-robust / robust objectives: the hinge asks the margin's lower bound to clear this (default 0)."),
        eps_warmup: float = typer.Option(None, "--eps-warmup", help="CTT-loose/strict: share of the step budget over which the training eps grows from 0 (default 0.5 for detect-or-robust and robust, 0 for ctt)."),
        code: str = typer.Option(None, "--code", help="SafetyNet: binary | quaternary (default quaternary)."),
        attack: list[str] = typer.Option(None, "--attack", help="Attacks making adversarial training examples (SafetyNet, mismatch), e.g. pgd:eps=0.1 or pgd:eps=auto (eps=auto: the eps at which FGSM halves the classifier's accuracy on the training split); default SafetyNet pgd:eps=auto, mismatch fgsm:eps=auto pgd:eps=auto saltpepper; repeatable."),
        svm_c: float = typer.Option(None, "--svm-c", help="SVM C (default: cross-validated grid)."),
        svm_gamma: float = typer.Option(None, "--svm-gamma", help="RBF gamma (default: cross-validated grid)."),
        max_train: int = typer.Option(None, "--max-train", help="Cap on detector training examples."),
        max_sv: int = typer.Option(None, "--max-sv", help="SafetyNet: support-vector budget (the SVM's cost per input grows with it; default 500)."),
        nic_detectors: int = typer.Option(None, "--nic-detectors", help="NIC: K randomised detector sets, majority vote."),
        nic_invariants: str = typer.Option(None, "--nic-invariants", help="NIC: value | provenance | both."),
        second_model: Path = typer.Option(None, "--second-model", help="Mismatch: the second model (.pt2, or .pt with --second-arch)."),
        second_arch: str = typer.Option(None, "--second-arch", help="Mismatch: package.module:factory of the second model."),
        train_second: bool = typer.Option(False, "--train-second", help="Mismatch: train a structurally different second model."),
        json_out: bool = JSON_OPTION,
    ):
        """Instrument MODEL with the chosen methods and write a .hardened bundle."""
        with errors_to_exit():
            from harden.io.atomic import check_output_path
            from harden.bundle.archive import save_bundle
            from harden.io.data import load_data, parse_input_range
            from harden.io.model import load_model
            from harden.instrumentation.pipeline import instrument as run_instrument
            from harden.methods.base import Options

            out = check_output_path(output or Path(model.name).with_suffix(".hardened"))
            generated_key = key is None
            key = key if key is not None else secrets.token_hex(16)
            from harden.errors import HardenError
            from harden.train.eps_search import parse_eps

            eps = parse_eps(eps)
            if eps == "auto" and not {"ctt-loose", "ctt-strict"} & set(method):
                raise HardenError(f"--eps {eps} sets the fine-tuning eps of ctt-loose or ctt-strict; add one of them or give a number")
            extra = {"epochs": epochs, "steps": steps, "patience": patience, "alpha": alpha, "alpha_growth": alpha_growth, "alpha_every": alpha_every,
                     "lr": lr, "detection_weight": detection_weight, "fire_margin": fire_margin,
                     "trap_rule": trap_rule, "trap_scale": trap_scale, "anneal": anneal, "trap_placement": trap_placement,
                     "objective": objective, "cert_margin": cert_margin, "eps_warmup": eps_warmup,
                     "code": code, "attacks": attack or None, "svm_c": svm_c, "svm_gamma": svm_gamma,
                     "max_train": max_train, "max_sv": max_sv, "nic_detectors": nic_detectors, "nic_invariants": nic_invariants,
                     "second_model": str(second_model) if second_model else None, "second_arch": second_arch,
                     "train_second": train_second or None, "trust_pickle": trust_pickle or None}
            options = Options(key=key, seed=seed, layers=list(layers or []), mask_ratio=mask_ratio, quantile=quantile,
                              fpr=fpr, fpr_confidence=fpr_confidence, eps=eps, threshold=threshold, device=device,
                              extra={k: v for k, v in extra.items() if v is not None})
            net = load_model(model, arch, trust_pickle)
            dataset = load_data(data, seed=seed, input_range=parse_input_range(input_range), limit=limit)
            with progress_reporter(not json_out) as progress:
                hardened = run_instrument(net, dataset, list(method), options, policy=policy, progress=progress)
                progress("writing bundle", 1.0)
                manifest = save_bundle(hardened, out)
            if json_out:
                emit_json({"bundle": str(out), "manifest": manifest})
                return
            if generated_key:
                console.print(f"key (keep it secret; needed to re-instrument identically): {key}", highlight=False)
            _print_summary(out, manifest)


def _print_finetuning(method: dict) -> None:
    """The fine-tuning history, one row per calibration check; the kept check is marked (rule:
    harden.train.finetune._better); then why training stopped."""
    history = method["config"].get("_history")
    if not history:
        return
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


def _print_summary(out: Path, manifest: dict) -> None:
    from harden.detectors.calibration import describe

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
