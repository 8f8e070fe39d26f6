"""The bundle's versioned manifest: methods, sites, thresholds, split, metrics, package versions."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata

import harden
from harden.instrumentation.hardened import HardenedModel

FORMAT = 1
_PACKAGES = ["torch", "onnx", "onnxruntime", "onnxscript", "scikit-learn", "skl2onnx", "numpy",
             "adversarial-robustness-toolbox"]


def package_versions() -> dict[str, str]:
    versions = {"harden": harden.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(hardened: HardenedModel) -> dict:
    facts = hardened.facts
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "methods": [
            {
                "name": m.name,
                "config": m.config,
                "head_inputs": m.head_inputs,
                "sites": m.sites,
                "detector": m.detector is not None,
                "threshold": facts["thresholds"][m.name],
                "scale": facts["scales"][m.name],
            }
            for m in hardened.methods
        ],
        "outputs": ["logits", *hardened.policy_output_names()],
        "finetuned": hardened.original_state is not None,
        "packages": package_versions(),
        **{k: v for k, v in facts.items() if k not in ("thresholds", "scales")},
    }


def public_manifest(hardened: HardenedModel) -> dict:
    """What may travel inside the ONNX file: the manifest holds no raw key, only its fingerprint."""
    manifest = build_manifest(hardened)
    for method in manifest["methods"]:
        method["config"] = {k: v for k, v in method["config"].items() if not k.startswith("_")}
    return manifest
