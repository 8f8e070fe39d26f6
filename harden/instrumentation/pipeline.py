"""The instrument stage: trace, fit every method (fine-tuning first), calibrate, gather the manifest facts."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from harden.core.progress import part
from harden.detectors.calibration import calibrate, check_split
from harden.errors import HardenError
from harden.graph.analyse import check_input_shape
from harden.graph.sizes import check_sizes
from harden.graph.trace import trace
from harden.instrumentation.hardened import LOGITS_OUTPUT, HardenedModel
from harden.instrumentation.recipe import recipe_of
from harden.io.data import Dataset
from harden.methods import load_all  # noqa: F401  (registers every method)
from harden.methods.base import METHODS, FitContext, MethodSpec, Options, key_fingerprint, parse_method
from harden.detectors.policy import AlarmPolicy, policy_k
from harden.train.flow_objective import finetune_flow, parse_objective

GOLDEN_SAMPLES = 256


def _accuracy(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.numpy()).mean())


def _golden_inputs(data: Dataset) -> np.ndarray:
    """Held-out test inputs plus rows with NaN and inf, so parity covers the non-finite alarm too."""
    x = data.test.x[:GOLDEN_SAMPLES].numpy().copy()
    bad = x[:2].copy()
    bad[0].reshape(-1)[0] = np.nan
    bad[1].reshape(-1)[-1] = np.inf
    return np.concatenate([x, bad]).astype(np.float32)


def instrument(
    model: nn.Module,
    data: Dataset,
    methods: Sequence[str | MethodSpec],
    options: Options | None = None,
    *,
    policy: str = "any",
    progress: Callable[[str, float], None] = lambda message, fraction: None,
    finetune: str | None = None,
) -> HardenedModel:
    """Add every requested method's detector to ``model`` and calibrate the combined alarm.

    ``methods``: ``name`` or ``name:key=value,...`` texts (the CLI's ``--method``) or :class:`MethodSpec`s.
    ``finetune``: a fine-tuning objective (``flow:delta=D,...``, :mod:`harden.train.flow_objective`) applied to
    the classifier before any method is fitted; the original weights are kept in the bundle.
    """
    options = (options or Options()).check()
    if not methods:
        raise HardenError("choose at least one --method")
    specs = [parse_method(m) for m in methods]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise HardenError(f"a --method is given twice: {', '.join(names)}")
    finetuning = [s.name for s in specs if METHODS.get(s.name).finetunes]
    if len(finetuning) > 1:
        raise HardenError(f"only one fine-tuning method at a time; got {', '.join(finetuning)}")
    objective = parse_objective(finetune) if finetune else None
    if objective is not None and finetuning:
        raise HardenError(f"--finetune and the fine-tuning method {finetuning[0]} would both train the classifier; "
                          "choose one")
    k = policy_k(policy, len(specs))
    # Fine-tuning changes the weights every other method is fitted on, so it runs first.
    order = sorted(specs, key=lambda s: not METHODS.get(s.name).finetunes)

    started = time.perf_counter()
    # A traced graph shares parameters with the user's model; fine-tuning must never change the caller's object.
    gm = copy.deepcopy(trace(model))
    check_sizes(gm, (2, *data.input_shape), "the model")   # no tensor above the caps, before anything runs
    check_input_shape(gm, data.train.x[:2])
    with torch.no_grad():
        outputs = gm(data.train.x[:2]).shape[1]
    if outputs < data.num_classes:
        raise HardenError(f"the data's labels reach {data.num_classes - 1} but the model has {outputs} outputs: "
                          f"labels must lie in 0..{outputs - 1}")
    if 0 < options.fpr < 1 and len(data.calibration) >= 2:
        check_split(len(data.calibration), options.fpr, options.fpr_confidence)  # fail before minutes of fitting
    original_state = copy.deepcopy(gm.state_dict())
    with torch.no_grad():   # in batches: data larger than memory is read on demand
        original_test_logits = np.concatenate([gm(data.test.x[i:i + 512]).numpy()
                                               for i in range(0, len(data.test), 512)])
    finetune_facts = None
    first = 0.0   # where the methods' fitting starts on the bar: after --finetune's share when it runs
    if objective is not None:
        first = 0.45
        tuning = part(progress, 0.0, first)
        tuning("fine-tuning (--finetune)", 0.0)
        finetune_facts = finetune_flow(gm, data, objective, tuning)
    fitted = []
    span = 0.95 - first
    for i, spec in enumerate(order):
        share = part(progress, first + span * i / len(order), first + span * (i + 1) / len(order))   # each reports 0..1
        share(f"fitting {spec.name}", 0.0)
        ctx = FitContext(gm=gm, data=data, options=options, settings=spec.settings, progress=share)
        method = METHODS.get(spec.name)().fit(ctx)
        method.config["options"] = spec.settings.to_dict()
        fitted.append(method)
    # a fine-tuning that kept the user's weights (no check accurate enough) leaves a plain, not a fine-tuned, bundle
    changed = (bool(finetuning) or objective is not None) and \
        any(not torch.equal(v, gm.state_dict()[k]) for k, v in original_state.items())
    hardened = HardenedModel(gm, fitted, original_state=original_state if changed else None)

    progress("calibrating", 0.95)
    raw_cal = hardened.raw_scores(hardened.torch_outputs(data.calibration.x))
    cal = calibrate(raw_cal, k, options.fpr, options.fpr_confidence)
    hardened.policy = AlarmPolicy(cal.thresholds, cal.scales, k)

    test_out = hardened.run(data.test.x)
    golden_x = _golden_inputs(data)
    hardened.facts = {
        "bundle_id": uuid.uuid4().hex,
        "input": {"shape": list(data.input_shape), "range": list(data.input_range)},
        "num_classes": int(outputs),   # the model's outputs (>= the data's classes)
        "data": {"name": data.name, "split": data.split},
        # The default eps of `harden certify`: the box a CTT fit trained on (a rule like "scaled" resolved).
        "eps": next((m.config["eps"] for m in fitted if isinstance(m.config.get("eps"), (int, float))), None),
        "recipe": recipe_of(data, specs, options, policy, objective.text() if objective else None),
        "policy": {"text": policy, "k": k, "methods": len(fitted)},
        "fpr_target": options.fpr,
        "fpr_confidence": options.fpr_confidence,
        "key_fingerprint": key_fingerprint(options.key),
        "seed": options.seed,
        "finetune": finetune_facts,
        "thresholds": {m.name: t for m, t in zip(fitted, cal.thresholds)},
        "scales": {m.name: s for m, s in zip(fitted, cal.scales)},
        "metrics": {
            "calibration_fpr": cal.achieved_fpr,
            "calibration_fpr_per_method": {m.name: f for m, f in zip(fitted, cal.per_method_fpr)},
            "calibration": cal.facts(),   # the order-statistic rule: allowed alarms, confidence, needed split, bound
            "test_fpr": float(test_out["alarm"].mean()),
            "test_fpr_per_method": {m.name: float(test_out[f"{m.name}.alarm"].mean()) for m in fitted},
            "test_accuracy": _accuracy(test_out[LOGITS_OUTPUT], data.test.y),
            "original_test_accuracy": _accuracy(original_test_logits, data.test.y),
            "calibration_samples": len(data.calibration),
            "test_samples": len(data.test),
            "seconds": round(time.perf_counter() - started, 2),
        },
    }
    hardened.golden = {"input": golden_x, **hardened.run(golden_x)}
    return hardened

