"""The Python API the CLI wraps: load, instrument, export, certify, evaluate."""

from __future__ import annotations

from pathlib import Path

from harden.core.progress import Progress, part, resolve_progress
from harden.instrumentation.hardened import HardenedModel
from harden.io.data import Dataset, load_data as _load_data


def load_model(path, arch: str | None = None, trust_pickle: bool = False):
    from harden.io.model import load_model as _load

    return _load(path, arch, trust_pickle)


def load_data(spec: str, **kwargs) -> Dataset:
    return _load_data(spec, **kwargs)


def instrument(model, data: Dataset, methods: list[str], options=None, *, policy: str = "any",
               progress: Progress | bool | None = None, finetune: str | None = None) -> HardenedModel:
    from harden.instrumentation.pipeline import instrument as _instrument

    return _instrument(model, data, methods, options, policy=policy, progress=resolve_progress(progress),
                       finetune=finetune)


def save_bundle(hardened: HardenedModel, path, *, seal_key: str | None = None, inputs=()) -> dict:
    """Write the bundle (never over one of ``inputs``); sealed with ``seal_key`` or HARDEN_SEAL_KEY when set."""
    from harden.bundle.archive import save_bundle as _save

    return _save(hardened, path, seal_key=seal_key, inputs=inputs)


def load_bundle(path, *, seal_key: str | None = None) -> tuple[HardenedModel, dict]:
    """A bundle checked as data from elsewhere; with ``seal_key`` (or HARDEN_SEAL_KEY) its seal must match."""
    from harden.bundle.archive import load_bundle as _load

    return _load(path, seal_key=seal_key)


def export_onnx(hardened: HardenedModel, path=None, source=None):
    from harden.export import export_onnx as _export

    return _export(hardened, path, source)


def bundle_data(manifest: dict, data: str | None = None) -> Dataset:
    """The data a bundle was instrumented on, split exactly as then (or other data, split with the same seed)."""
    from harden.bundle.data import bundle_data as _bundle_data

    return _bundle_data(manifest, data)


def split_of(dataset: Dataset, name: str):
    from harden.bundle.data import split_of as _split_of

    return _split_of(dataset, name)


def scorer_for(hardened: HardenedModel, onnx_path: Path | None, source=None):
    """An onnxruntime session of the exported graph: the given file, or a fresh parity-checked export."""
    from harden.export.scorer import scorer_for as _scorer_for

    return _scorer_for(hardened, onnx_path, source)


def evaluate(hardened: HardenedModel, manifest: dict, attacks: list[str], *, onnx_path: Path | None = None,
             data: str | None = None, split: str = "test", limit: int | None = 500, seed: int = 0,
             progress: Progress | bool | None = None, adversarial: list[Path] = (), batch_size: int | None = None,
             device: str = "cpu"):
    """Attacks (ART) against the classifier, and adversarial sets crafted elsewhere (``adversarial``: .npz
    files, :mod:`harden.io.adversarial`); alarms and scores read from the ONNX graph in onnxruntime."""
    from harden.evaluation.bundle import evaluate_bundle

    return evaluate_bundle(hardened, manifest, attacks, onnx_path=onnx_path, data=data, split=split, limit=limit,
                           seed=seed, progress=resolve_progress(progress), adversarial=adversarial,
                           batch_size=batch_size, device=device)


def evaluate_adaptive(hardened: HardenedModel, manifest: dict, *, eps: float = 0.1, norm: str = "linf",
                      steps: int = 100, onnx_path: Path | None = None, data: str | None = None, split: str = "test",
                      limit: int | None = 500, attackers: tuple[str, ...] | None = None, proxy: Path | None = None,
                      progress: Progress | bool | None = None, seal_key: str | None = None) -> dict:
    """Type II attacks (key known: smoothed surrogates of the detectors as shipped; key unknown: the attacker's
    own model of the keyed parts, or a proxy bundle hardened with another key) beside the detector-blind
    baseline, every final input judged by the exported graph."""
    from harden.evaluation.bundle import evaluate_adaptive_bundle

    return evaluate_adaptive_bundle(hardened, manifest, eps=eps, norm=norm, steps=steps, onnx_path=onnx_path,
                                    data=data, split=split, limit=limit, attackers=attackers, proxy=proxy,
                                    progress=resolve_progress(progress), seal_key=seal_key)


def check_certify_arguments(eps, split: str, limit, check: int) -> None:
    """What certify can check before a bundle is read (--eps against the input range comes after)."""
    from harden.certification.bundle import check_certify_arguments as _check

    _check(eps, split, limit, check)


def check_evaluate_arguments(split: str, limit, **adaptive) -> None:
    """What evaluate can check before a bundle is read (``adaptive``: the --adaptive-* settings)."""
    from harden.evaluation.bundle import check_evaluate_arguments as _check

    _check(split, limit, **adaptive)


def ctt_traps(hardened: HardenedModel):
    """The CTT traps as the exported alarm sees them (:func:`harden.certification.bundle.ctt_traps`)."""
    from harden.certification.bundle import ctt_traps as _ctt_traps

    return _ctt_traps(hardened)


def original_classifier(hardened: HardenedModel):
    """The user's model before any fine-tuning (same graph, original weights)."""
    from harden.instrumentation.hardened import original_classifier as _original

    return _original(hardened)


def certify(hardened: HardenedModel, manifest: dict, eps: list[float] | None = None, *, data: str | None = None,
            split: str = "test", limit: int | None = None, check: int = 0, seed: int = 0, bounds: str = "ibp",
            threats: list[str] | None = None, progress: Progress | bool | None = None, device: str = "cpu",
            batch_size: int = 256) -> dict:
    """Placement, robust and detect-or-robust certificates (hardened vs original), and the sampling check.

    ``bounds``: ``ibp`` (interval), ``crown-ibp`` (backward linear-relaxation margin on interval intermediates)
    or ``crown`` (backward linear relaxation throughout; tightest, slowest).
    ``threats``: ``flow:delta=D[,tv=T]`` texts (:mod:`harden.certification.flow`) certified instead of the
    L-inf boxes of ``eps`` (``linf`` stands for those boxes); results are keyed by each threat's label.
    ``device``: where bounds and the check's points are computed.  ``batch_size``: samples bounded at once.
    Under torchrun the batches are split across the ranks, and every rank returns the same merged report.
    """
    from harden.certification.bundle import certify_bundle

    return certify_bundle(hardened, manifest, eps, data=data, split=split, limit=limit, check=check, seed=seed,
                          bounds=bounds, threats=threats, progress=resolve_progress(progress), device=device,
                          batch_size=batch_size)


def make_report(hardened: HardenedModel, manifest: dict, path, settings=None, *, onnx_path: Path | None = None,
                target: Path | None = None, progress: Progress | bool | None = None) -> dict:
    """``harden report``: measure every figure once (:class:`harden.report.settings.ReportSettings`), write ONE
    self-contained HTML file to ``path`` atomically, and return the figures as JSON.  ``onnx_path``: the exported
    file to judge and time (else a fresh export of the bundle); ``target``: the file the report is about (its title)."""
    from harden.io.atomic import check_output_path
    from harden.report import write_html
    from harden.report.collect import collect
    from harden.report.settings import ReportSettings

    check_output_path(Path(path))   # before minutes of attacks
    say = resolve_progress(progress)
    figures = collect(hardened, manifest, settings or ReportSettings(), onnx_path=onnx_path,
                      target=target or onnx_path, progress=part(say, 0.0, 0.95))
    write_html(figures, path, progress=part(lambda m, f: say(f"[plots] {m}", f), 0.95, 1.0))
    return figures
