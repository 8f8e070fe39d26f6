"""Every figure of a report, measured once: the JSON that ``harden report --json`` prints and the HTML draws.

Stages (each reported to ``progress``): the attacks of the ROC and strength sections in ONE evaluation through the
exported graph; the certificates over the eps grid; the latency of the exported graph against the plain
classifier's.  The summary and calibration sections read the manifest.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import harden
from harden.core.progress import Progress
from harden.bundle.data import bundle_data, split_of
from harden.certification.bundle import certify_bundle
from harden.detectors.calibration import describe
from harden.errors import HardenError
from harden.evaluation.bundle import evaluate_bundle
from harden.export.latency import compare_latency, plain_graph
from harden.export.runtime import OnnxGraph
from harden.export.scorer import scorer_for
from harden.instrumentation.hardened import HardenedModel
from harden.report.series import certified_series, strength_series
from harden.report.settings import Plan, ReportSettings, plan

STAGES = ("attacks", "certificates", "latency")


def _scalar_settings(config: dict) -> dict:
    """A method's recorded settings worth a glance: scalars only, private (``_``) and per-site lists left out."""
    return {k: v for k, v in config.items()
            if not k.startswith("_") and isinstance(v, (str, int, float, bool)) and k != "key_fingerprint"}


def summary(manifest: dict) -> dict:
    split = manifest["data"]["split"]
    return {
        "methods": [{"name": m["name"], "sites": list(m["sites"]),
                     "detector": "scikit-learn (ONNX)" if m["detector"] else "in graph",
                     "threshold": m["threshold"], "settings": _scalar_settings(m.get("config", {}))}
                    for m in manifest["methods"]],
        "policy": manifest["policy"],
        "key_fingerprint": manifest.get("key_fingerprint"),
        "finetuned": bool(manifest.get("finetuned")),
        "eps": manifest.get("eps"),
        "input": manifest["input"],
        "num_classes": manifest["num_classes"],
        "data": {"name": manifest["data"]["name"], "seed": split.get("seed"), "sizes": split.get("sizes"),
                 "fractions": split.get("fractions"), "fingerprint": split.get("fingerprint")},
        "bundle_id": manifest.get("bundle_id"),
        "created": manifest.get("created"),
        "harden": manifest.get("packages", {}).get("harden"),
    }


def calibration(manifest: dict) -> dict:
    metrics = manifest.get("metrics", {})
    rows = [{"detector": m["name"],
             "calibration_fpr": metrics.get("calibration_fpr_per_method", {}).get(m["name"]),
             "test_fpr": metrics.get("test_fpr_per_method", {}).get(m["name"])} for m in manifest["methods"]]
    rows.append({"detector": f"combined (policy {manifest['policy']['text']})",
                 "calibration_fpr": metrics.get("calibration_fpr"), "test_fpr": metrics.get("test_fpr")})
    return {"fpr_target": manifest["fpr_target"], "fpr_confidence": manifest.get("fpr_confidence"), "rows": rows,
            "statement": describe(metrics.get("calibration"), manifest["fpr_target"]),
            "test_accuracy": metrics.get("test_accuracy"),
            "original_test_accuracy": metrics.get("original_test_accuracy")}


def _stage(progress: Progress, index: int) -> Progress:
    """Progress within stage ``index`` mapped onto the whole run, its name in front of the message."""
    def report(message: str, fraction: float) -> None:
        progress(f"[{index + 1}/{len(STAGES)} {STAGES[index]}] {message}", (index + min(max(fraction, 0.0), 1.0)) / len(STAGES))
    return report


def _attacks(hardened, manifest, settings: ReportSettings, the_plan: Plan, graph: OnnxGraph, progress: Progress) -> dict:
    labels = the_plan.attack_labels
    report = evaluate_bundle(hardened, manifest, labels, data=settings.data, split=settings.split, limit=settings.limit,
                             seed=settings.seed, graph=graph, progress=progress)
    evaluation = report.to_dict(curves=True)
    evaluation["roc_attacks"] = list(the_plan.roc_attacks)
    groups = [(s["attack"], s["labels"]) for s in the_plan.strength]
    return {"evaluation": evaluation, "strength": strength_series(evaluation["rows"], groups)}


def _certificates(hardened, manifest, settings: ReportSettings, the_plan: Plan, progress: Progress) -> dict:
    try:
        report = certify_bundle(hardened, manifest, the_plan.certify_eps, data=settings.data, split=settings.split,
                                limit=settings.certify_limit, seed=settings.seed, bounds=settings.bounds,
                                progress=progress)
    except HardenError as exc:   # e.g. an op without a bound rule: the rest of the report still stands
        return {"skipped": str(exc).strip().splitlines()[0]}
    report["series"] = certified_series(report)
    return report


def _latency(hardened, manifest, settings: ReportSettings, graph: OnnxGraph, progress: Progress) -> dict:
    import torch

    threads = settings.latency_threads
    progress("exporting the plain classifier", 0.0)
    example = torch.as_tensor(hardened.golden["input"][:2])
    plain = plain_graph(hardened.classifier, example, threads=threads)
    shipped = OnnxGraph(graph.model_bytes, threads=threads)
    inputs = split_of(bundle_data(manifest, settings.data), settings.split).x.numpy()
    timing = compare_latency(plain, shipped, inputs, rounds=settings.latency_rounds, progress=progress)
    return {"threads": threads, "provider": "CPUExecutionProvider", **timing}


def collect(hardened: HardenedModel, manifest: dict, settings: ReportSettings = ReportSettings(), *,
            onnx_path: Path | None = None, target: Path | None = None, progress: Progress = lambda m, f: None) -> dict:
    """The report's figures as plain JSON.  ``onnx_path``: the exported file to judge and time (else a fresh,
    parity-checked export of the bundle)."""
    the_plan = plan(settings, manifest)
    _stage(progress, 0)("exporting the graph" if onnx_path is None else f"loading {onnx_path}", 0.0)
    graph = scorer_for(hardened, onnx_path)
    attacks = _attacks(hardened, manifest, settings, the_plan, graph, _stage(progress, 0))
    certification = _certificates(hardened, manifest, settings, the_plan, _stage(progress, 1))
    latency = _latency(hardened, manifest, settings, graph, _stage(progress, 2))
    return {
        "report": {"target": str(target) if target else None, "graph": str(onnx_path) if onnx_path else
                   "a fresh export of the bundle (parity-checked)",
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "harden": harden.__version__, "settings": settings.to_dict(),
                   "certify_eps": the_plan.certify_eps},
        "summary": summary(manifest),
        "calibration": calibration(manifest),
        **attacks,
        "certification": certification,
        "latency": latency,
    }
