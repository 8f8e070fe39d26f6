"""The bundle's versioned manifest: methods, sites, thresholds, split, metrics, package versions."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
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


# ----------------------------------------------------------------------------- validation of a manifest read from a file

MAX_METHODS = 32
MAX_CLASSES = 1 << 20
MAX_INPUT_SIDE = 1 << 16
MAX_NAMES = 1 << 16


class _Checker:
    """Type and range checks with one line naming the field (``manifest.json: policy.k must be ...``)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, value) -> None:
        from harden.errors import HardenError

        raise HardenError(f"{self.where}: {field} must be {expected}, got {_show(value)}")

    def obj(self, parent: dict, key: str, field: str, optional: bool = False) -> dict | None:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def text(self, value, field: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > 4096:
            self.fail(field, "a string", value)
        return value

    def integer(self, value, field: str, lo: int, hi: int, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if type(value) is not int or not lo <= value <= hi:
            self.fail(field, f"a whole number in [{lo}, {hi}]", value)
        return value

    def number(self, value, field: str, lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False,
               open_hi: bool = False, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        ok = type(value) in (int, float) and math.isfinite(value)
        ok = ok and (value > lo if open_lo else value >= lo) and (value < hi if open_hi else value <= hi)
        if not ok:
            left, right = "(" if open_lo else "[", ")" if open_hi else "]"
            self.fail(field, f"a finite number in {left}{lo:g}, {hi:g}{right}", value)
        return value

    def flag(self, value, field: str) -> bool:
        if type(value) is not bool:
            self.fail(field, "true or false", value)
        return value

    def names(self, value, field: str) -> list[str]:
        if not isinstance(value, list) or len(value) > MAX_NAMES or not all(isinstance(v, str) for v in value):
            self.fail(field, "a list of names", value)
        return value


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_manifest(manifest, where: str) -> dict:
    """The manifest of a bundle from elsewhere, checked field by field before anything uses it."""
    from harden.detectors.policy import policy_k
    from harden.errors import HardenError
    from harden.methods import load_all  # noqa: F401  (registers every method)
    from harden.methods.base import METHODS

    check = _Checker(where)
    if not isinstance(manifest, dict):
        check.fail("the manifest", "a JSON object", manifest)
    version = manifest.get("format")
    if type(version) is not int or version != FORMAT:
        raise HardenError(f"{where}: bundle format {_show(version)} is not supported (this harden reads {FORMAT})")
    methods = manifest.get("methods")
    if not isinstance(methods, list) or not 1 <= len(methods) <= MAX_METHODS:
        check.fail("methods", f"a list of 1 to {MAX_METHODS} methods", methods)
    names = []
    for i, entry in enumerate(methods):
        field = f"methods[{i}]"
        if not isinstance(entry, dict):
            check.fail(field, "an object", entry)
        name = check.text(entry.get("name"), f"{field}.name")
        METHODS.get(name)   # one line listing the known methods
        names.append(name)
        check.obj(entry, "config", f"{field}.config")
        check.names(entry.get("head_inputs"), f"{field}.head_inputs")
        check.names(entry.get("sites"), f"{field}.sites")
        check.flag(entry.get("detector"), f"{field}.detector")
        check.number(entry.get("threshold"), f"{field}.threshold")
        check.number(entry.get("scale"), f"{field}.scale", 0.0, open_lo=True)
    if len(set(names)) != len(names):
        raise HardenError(f"{where}: a method appears twice ({', '.join(names)})")
    policy = check.obj(manifest, "policy", "policy")
    text = check.text(policy.get("text"), "policy.text")
    k = check.integer(policy.get("k"), "policy.k", 1, len(methods))
    check.integer(policy.get("methods"), "policy.methods", len(methods), len(methods))
    try:
        meant = policy_k(text, len(methods))
    except HardenError as exc:
        raise HardenError(f"{where}: policy.text: {exc}") from None
    if meant != k:
        raise HardenError(f"{where}: policy.k is {k} but policy {text!r} over {len(methods)} method(s) means {meant}")
    expected_outputs = ["logits", "score", "alarm"] + [f"{n}.{o}" for n in names for o in ("score", "alarm")]
    if manifest.get("outputs") != expected_outputs:
        check.fail("outputs", json.dumps(expected_outputs), manifest.get("outputs"))
    shape_doc = check.obj(manifest, "input", "input")
    shape = shape_doc.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int and 1 <= s <= MAX_INPUT_SIDE for s in shape):
        check.fail("input.shape", f"three sizes C, H, W in [1, {MAX_INPUT_SIDE}]", shape)
    from harden.core.limits import check_elements

    check_elements([2, *shape], f"{where}: input.shape")
    value_range = shape_doc.get("range")
    if not isinstance(value_range, list) or len(value_range) != 2:
        check.fail("input.range", "two numbers [lo, hi]", value_range)
    lo = check.number(value_range[0], "input.range[0]")
    check.number(value_range[1], "input.range[1]", lo, open_lo=True)
    check.integer(manifest.get("num_classes"), "num_classes", 2, MAX_CLASSES)
    data = check.obj(manifest, "data", "data")
    check.text(data.get("name"), "data.name")
    split = check.obj(data, "split", "data.split")
    check.integer(split.get("seed", 0), "data.split.seed", -(1 << 63), (1 << 64) - 1)
    check.integer(split.get("limit"), "data.split.limit", 1, 1 << 40, optional=True)
    check.text(split.get("fingerprint"), "data.split.fingerprint", optional=True)
    if "fractions" in split:
        fractions = split["fractions"]
        if not isinstance(fractions, list) or len(fractions) != 3:
            check.fail("data.split.fractions", "three numbers", fractions)
        for j, f in enumerate(fractions):
            check.number(f, f"data.split.fractions[{j}]", 0.0, 1.0, open_lo=True)
    check.number(manifest.get("eps"), "eps", 0.0, open_lo=True, optional=True)
    check.number(manifest.get("fpr_target"), "fpr_target", 0.0, 1.0)
    check.number(manifest.get("fpr_confidence"), "fpr_confidence", 0.0, 1.0, open_hi=True, optional=True)
    check.text(manifest.get("key_fingerprint"), "key_fingerprint")
    check.text(manifest.get("bundle_id"), "bundle_id")
    check.text(manifest.get("created"), "created")
    check.flag(manifest.get("finetuned"), "finetuned")
    packages = check.obj(manifest, "packages", "packages")
    for name, version in packages.items():
        check.text(version, f"packages.{name}")
    check.text(packages.get("harden"), "packages.harden")
    _validate_metrics(check, manifest, names)
    if "recipe" in manifest:
        _validate_recipe(check, manifest["recipe"])
    return manifest


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _validate_recipe(check: _Checker, recipe) -> None:
    """`harden inspect --recipe` prints it as TOML that `instrument --recipe` reads back: keys that TOML can say
    bare (no newline or quote to inject a line), values that are numbers, text, flags or lists of them."""
    if not isinstance(recipe, dict):
        check.fail("recipe", "an object", recipe)

    def plain(value, field: str) -> None:
        if isinstance(value, list):
            for item in value:
                plain(item, field)
        elif value is not None and not isinstance(value, (str, bool, int, float)):
            check.fail(field, "a number, text, flag or list", value)

    for key, value in recipe.items():
        if not _KEY.match(key):
            check.fail("recipe", "keys that are plain names", key)
        if key == "methods":
            if not isinstance(value, dict):
                check.fail("recipe.methods", "an object", value)
            for name, options in value.items():
                if not _KEY.match(name) or not isinstance(options, dict):
                    check.fail(f"recipe.methods.{name}", "an object under a plain name", options)
                for option, setting in options.items():
                    if not _KEY.match(option):
                        check.fail(f"recipe.methods.{name}", "keys that are plain names", option)
                    plain(setting, f"recipe.methods.{name}.{option}")
        else:
            plain(value, f"recipe.{key}")


def _validate_metrics(check: _Checker, manifest: dict, names: list[str]) -> None:
    """The figures instrument and inspect print: numbers where numbers are printed."""
    metrics = check.obj(manifest, "metrics", "metrics")
    # absent is fine (bundles written before a figure existed); present means a number
    for key in ("calibration_fpr", "test_fpr", "test_accuracy", "original_test_accuracy"):
        if key in metrics:
            check.number(metrics[key], f"metrics.{key}", 0.0, 1.0)
    for key in ("calibration_fpr_per_method", "test_fpr_per_method"):
        per_method = check.obj(metrics, key, f"metrics.{key}") if key in metrics else {}
        for name, value in per_method.items():
            check.number(value, f"metrics.{key}.{name}", 0.0, 1.0)
    calibration = check.obj(metrics, "calibration", "metrics.calibration") if "calibration" in metrics else None
    if calibration:
        for key in ("samples", "allowed_alarms", "alarms"):
            check.integer(calibration.get(key), f"metrics.calibration.{key}", 0, 1 << 40)
        if "needed_samples" not in calibration:
            check.fail("metrics.calibration.needed_samples", "present (a whole number or null)", None)
        check.integer(calibration["needed_samples"], "metrics.calibration.needed_samples", 0, 1 << 40, optional=True)
        check.number(calibration.get("confidence"), "metrics.calibration.confidence", 0.0, 1.0)
        check.number(calibration.get("fpr_upper_bound"), "metrics.calibration.fpr_upper_bound", 0.0, 1.0,
                     optional=True)
