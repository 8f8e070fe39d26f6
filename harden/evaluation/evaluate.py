"""Evaluation: real attacks against the classifier, detectors scored through whatever ships.

The attacks (:mod:`harden.attacks.catalog`) are crafted against the plain torch
classifier; the detectors are read by calling a *scorer*, a function from a
float32 NCHW batch to the ONNX contract's outputs (in harden, an onnxruntime
session of the exported graph), so what is measured is what ships.

The numbers follow the CTT paper's Table 1:

* accuracy under attack: fraction of all adversarial examples the scorer's
  logits still classify correctly;
* detection rate: fraction raising ``alarm`` among adversarial examples whose
  clean input the scorer classified correctly ("originally correct"); also
  among the *successful* ones (originally correct and now misclassified);
* mean l2 / l-inf of the perturbation over the originally-correct inputs;
* false-positive rate: ``alarm`` rate on all the clean inputs (the paper's
  "No Attack" detection column), and per method from ``<method>.alarm``;
* ROC-AUC per detector (``score`` and each ``<method>.score``): all clean
  inputs (negatives) against the originally-correct adversarial ones
  (positives).

A rate or AUC over an empty set is ``None`` (null in JSON), never NaN.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch

from harden.attacks.catalog import AttackSpec, run_attack
from harden.core.progress import Progress, silent
from harden.errors import HardenError

Scorer = Callable[[np.ndarray], dict[str, np.ndarray]]

SCORE_SUFFIX = ".score"
ALARM_SUFFIX = ".alarm"


@dataclass
class AttackRow:
    attack: str                               # the spec's canonical label
    n: int                                    # adversarial examples made (all inputs)
    accuracy: float                           # under attack, over all n
    detection_rate: float | None              # alarm among the originally correct
    detection_rate_successful: float | None   # alarm among originally correct and now wrong
    mean_l2: float | None                     # over the originally correct
    mean_linf: float | None
    roc_auc: dict[str, float | None]          # "score" and every "<method>.score"
    per_method_detection: dict[str, float | None]  # "<method>" -> alarm rate among the originally correct
    seconds: float                            # attack + scoring wall time
    n_correct: int = 0                        # originally correct (the detection denominators)
    n_successful: int = 0                     # of those, misclassified after the attack
    params: dict[str, Any] = field(default_factory=dict)  # every attack parameter, defaults filled in
    # per detector, the ROC curve behind its AUC ({"fpr": [...], "tpr": [...]}); in JSON only when asked
    roc_curves: dict[str, dict | None] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class EvaluationReport:
    clean_accuracy: float
    clean_fpr: float
    per_method_fpr: dict[str, float]
    rows: list[AttackRow]
    n_clean: int

    def to_dict(self, curves: bool = False) -> dict:
        """Plain JSON types only; NaN never appears (empty sets are null).  ``curves``: keep each row's ROC
        curves (``roc_curves``), which the plots draw."""
        rows = [asdict(row) for row in self.rows]
        if not curves:
            for row in rows:
                del row["roc_curves"]
        out = {
            "clean_accuracy": self.clean_accuracy,
            "clean_fpr": self.clean_fpr,
            "per_method_fpr": dict(self.per_method_fpr),
            "n_clean": self.n_clean,
            "rows": rows,
        }
        return _jsonable(out)

    def to_json(self) -> str:
        """The report as JSON text (what `harden evaluate --json` prints)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationReport":
        names = {f.name for f in fields(AttackRow)}
        rows = [AttackRow(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
        return cls(clean_accuracy=data["clean_accuracy"], clean_fpr=data["clean_fpr"],
                   per_method_fpr=dict(data["per_method_fpr"]), rows=rows, n_clean=data["n_clean"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- metrics


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def roc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> dict | None:
    """The ROC curve of adversarial (positive) against clean (negative) scores and its area:
    ``{"fpr": [...], "tpr": [...], "auc": float}``; None if either side is empty.

    Non-finite scores are mapped to the ends of the float range (NaN counts as
    most suspicious: the graph raises its alarm on non-finite input anyway).
    The area is the trapezoid under exactly these points (what ``roc_auc_score`` computes).
    """
    from sklearn.metrics import auc, roc_curve

    if len(clean_scores) == 0 or len(adv_scores) == 0:
        return None
    scores = np.concatenate([clean_scores, adv_scores]).astype(np.float64).reshape(-1)
    top = np.finfo(np.float64).max
    scores = np.nan_to_num(scores, nan=top, posinf=top, neginf=-top)
    labels = np.concatenate([np.zeros(len(clean_scores)), np.ones(len(adv_scores))])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(auc(fpr, tpr))}


def roc_auc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float | None:
    """ROC-AUC of adversarial (positive) against clean (negative) scores; None if either side is empty."""
    curve = roc(clean_scores, adv_scores)
    return None if curve is None else curve["auc"]


def method_names(out: dict[str, np.ndarray]) -> list[str]:
    """Methods present in a scorer's output: every ``<method>.score`` or ``<method>.alarm``."""
    names = {k[: -len(s)] for k in out for s in (SCORE_SUFFIX, ALARM_SUFFIX) if k.endswith(s) and len(k) > len(s)}
    return sorted(names)


def _score(scorer: Scorer, x: np.ndarray, num_classes: int, what: str) -> dict[str, np.ndarray]:
    out = scorer(np.ascontiguousarray(x, dtype=np.float32))
    if not isinstance(out, dict):
        raise HardenError(f"the scorer returned {type(out).__name__}, not a dict of outputs")
    missing = [k for k in ("logits", "alarm", "score") if k not in out]
    if missing:
        raise HardenError(f"the scorer's outputs lack {', '.join(missing)} (it has: {', '.join(sorted(out)) or 'none'})")
    out = {k: np.asarray(v) for k, v in out.items()}
    n = len(x)
    if out["logits"].shape != (n, num_classes):
        raise HardenError(f"scoring {what}: logits have shape {out['logits'].shape}, expected ({n}, {num_classes})")
    for key, value in out.items():
        if key == "logits":
            continue
        if key in ("alarm", "score") or key.endswith((SCORE_SUFFIX, ALARM_SUFFIX)):
            if value.reshape(-1).shape != (n,):
                raise HardenError(f"scoring {what}: output {key!r} has shape {value.shape}, expected ({n},)")
            out[key] = value.reshape(-1)
    for key in list(out):
        if key == "alarm" or key.endswith(ALARM_SUFFIX):
            out[key] = out[key].astype(bool)
    return out


def _detectors(out: dict[str, np.ndarray]) -> list[str]:
    return ["score"] + [k for k in sorted(out) if k.endswith(SCORE_SUFFIX) and k != SCORE_SUFFIX]


# --------------------------------------------------------------------------- evaluate


def _first(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` inputs (all when None); an empty result or a limit below 1 is an error."""
    if limit is not None:
        if limit < 1:
            raise HardenError(f"--limit must be positive; got {limit}")
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise HardenError("nothing to evaluate: no inputs")
    return x, y


def _row(label: str, x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, correct: np.ndarray,
         clean: dict[str, np.ndarray], adv: dict[str, np.ndarray], seconds: float, params: dict) -> AttackRow:
    """One table row: ``x_adv`` made from ``x`` (None: unknown), ``correct`` the inputs the detection rates
    count, ``clean`` the clean scores the ROC-AUC compares against."""
    wrong_now = adv["logits"].argmax(axis=1) != y
    successful = correct & wrong_now
    l2 = linf = None
    if x is not None:
        delta = (x_adv - x).reshape(len(x), -1).astype(np.float64)
        l2 = _mean(np.linalg.norm(delta, axis=1)[correct])
        linf = _mean((np.abs(delta).max(axis=1) if delta.shape[1] else np.zeros(len(x)))[correct])
    methods = method_names(clean)
    curves = {d: roc(clean[d], adv[d][correct]) if d in adv else None for d in _detectors(clean)}
    return AttackRow(
        attack=label,
        n=len(x_adv),
        accuracy=float(np.mean(~wrong_now)),
        detection_rate=_rate(adv["alarm"][correct]),
        detection_rate_successful=_rate(adv["alarm"][successful]),
        mean_l2=l2,
        mean_linf=linf,
        roc_auc={d: None if c is None else c["auc"] for d, c in curves.items()},
        per_method_detection={m: _rate(adv[m + ALARM_SUFFIX][correct]) if m + ALARM_SUFFIX in adv else None
                              for m in methods},
        seconds=seconds,
        n_correct=int(correct.sum()),
        n_successful=int(successful.sum()),
        params=params,
        roc_curves={d: None if c is None else {"fpr": c["fpr"], "tpr": c["tpr"]} for d, c in curves.items()},
    )


def _given_row(scorer: Scorer, given_set, clean: dict[str, np.ndarray], num_classes: int) -> AttackRow:
    """A set crafted elsewhere (:mod:`harden.io.adversarial`).  With its clean inputs: the same measures as
    an attack's row, the AUC against those clean inputs.  Without: every input counts as originally correct
    (detection over all, "successful" = misclassified), no perturbation size, the AUC against the split's
    clean inputs."""
    start = time.perf_counter()
    adv = _score(scorer, given_set.x, num_classes, given_set.label)
    params = {"inputs": len(given_set.x), "clean_pairs": given_set.x_clean is not None}
    if given_set.x_clean is None:
        correct = np.ones(len(given_set.x), dtype=bool)
        return _row(given_set.label, None, given_set.x, given_set.y, correct, clean, adv,
                    time.perf_counter() - start, params)
    own_clean = _score(scorer, given_set.x_clean, num_classes, f"the clean inputs of {given_set.label}")
    correct = own_clean["logits"].argmax(axis=1) == given_set.y
    return _row(given_set.label, given_set.x_clean, given_set.x, given_set.y, correct, own_clean, adv,
                time.perf_counter() - start, params)


def evaluate(model: torch.nn.Module, scorer: Scorer, x: np.ndarray, y: np.ndarray, attacks: list[AttackSpec], *,
             input_range: tuple[float, float], num_classes: int, seed: int = 0, limit: int | None = None,
             progress: Progress | None = None, given: list = ()) -> EvaluationReport:
    """Clean row, then each attack: crafted on ``model``, scored with ``scorer``; then each ``given`` set
    (:class:`harden.io.adversarial.AdversarialSet`, crafted elsewhere), scored as it is.

    ``limit`` keeps the first ``limit`` inputs (the data splits are already
    seeded shuffles). Every attack runs with the same ``seed``.  ``limit`` does not cut the given sets.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if len(x) != len(y):
        raise HardenError(f"{len(x)} inputs but {len(y)} labels")
    x, y = _first(x, y, limit)
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    say = progress or silent
    steps = 1 + 2 * len(attacks) + len(given)   # clean scoring; each attack's run and scoring; each given set

    say(f"scoring {len(x)} clean inputs", 0.0)
    clean = _score(scorer, x, num_classes, "the clean inputs")
    clean_pred = clean["logits"].argmax(axis=1)
    correct = clean_pred == y
    methods = method_names(clean)
    per_method_fpr = {m: float(np.mean(clean[m + ALARM_SUFFIX])) for m in methods if m + ALARM_SUFFIX in clean}

    rows: list[AttackRow] = []
    for i, spec in enumerate(attacks, 1):
        label = spec.label()
        say(f"attack {i}/{len(attacks)}: {label} on {len(x)} inputs", (2 * i - 1) / steps)
        start = time.perf_counter()
        x_adv = run_attack(model, spec, x, y, input_range=input_range, num_classes=num_classes, seed=seed)
        say(f"attack {i}/{len(attacks)}: scoring {label}", 2 * i / steps)
        adv = _score(scorer, x_adv, num_classes, f"the {label} examples")
        rows.append(_row(label, x, x_adv, y, correct, clean, adv, time.perf_counter() - start,
                         dict(spec.resolved())))
    for j, given_set in enumerate(given):
        say(f"scoring {given_set.label}: {len(given_set.x)} inputs", (1 + 2 * len(attacks) + j) / steps)
        rows.append(_given_row(scorer, given_set, clean, num_classes))
    say("done", 1.0)

    return EvaluationReport(
        clean_accuracy=float(np.mean(correct)),
        clean_fpr=float(np.mean(clean["alarm"])),
        per_method_fpr=per_method_fpr,
        rows=rows,
        n_clean=len(x),
    )


# --------------------------------------------------------------------------- table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(report: EvaluationReport):
    """A rich table: "no attack" (accuracy, FPR as its detection rate), then one row per attack."""
    from rich.table import Table

    methods = ", ".join(f"{m} {_pct(v)}" for m, v in report.per_method_fpr.items())
    caption = (f"{report.n_clean} inputs; det = alarm rate on originally-correct inputs, det(succ) on those the "
               "attack fooled; AUC = ROC-AUC of score (clean vs attacked); s = seconds")
    if methods:
        caption += f"; clean FPR per method: {methods}"
    table = Table(title="harden evaluate", caption=caption)
    table.add_column("attack", no_wrap=True)
    for name in ("acc", "det", "det(succ)", "l2", "linf", "AUC", "s"):  # short: the table fits 80 columns
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row("no attack", _pct(report.clean_accuracy), _pct(report.clean_fpr), "-", "-", "-", "-", "-")
    for row in report.rows:
        table.add_row(row.attack, _pct(row.accuracy), _pct(row.detection_rate), _pct(row.detection_rate_successful),
                      _num(row.mean_l2), _num(row.mean_linf), _num(row.roc_auc.get("score")), f"{row.seconds:.1f}")
    return table


# --------------------------------------------------------------------------- adaptive (type II)


def _original_row(hardened, original, x: np.ndarray, y: np.ndarray, settings, input_range) -> dict[str, Any]:
    from harden.evaluation.adaptive import KEY_KNOWN, adaptive_attack

    before = replace(hardened, classifier=original)
    with torch.no_grad():
        correct = original(torch.from_numpy(x)).argmax(1).numpy() == y
    attack = adaptive_attack(before, x, y, replace(settings, attacker=KEY_KNOWN), input_range=input_range,
                             lams=(0.0,), supports=("all",))
    with torch.no_grad():
        fooled = original(torch.from_numpy(attack["x_adv"])).argmax(1).numpy() != y
    return {"fooled": _rate(fooled[correct]), "n_correct": int(correct.sum()),
            "mean_linf": _mean(np.abs(attack["x_adv"] - x).reshape(len(x), -1).max(axis=1)[correct]) if len(x) else None}


def _keyed(hardened) -> bool:
    """Whether any modelled method has a part the key decides (a surrogate says ``keyed = False`` otherwise)."""
    from harden.methods.surrogates import surrogates_for

    return any(getattr(s, "keyed", True) for s in surrogates_for(hardened).values())


def evaluate_adaptive(hardened, scorer: Scorer, x: np.ndarray, y: np.ndarray, settings, *,
                      input_range: tuple[float, float], num_classes: int, limit: int | None = None,
                      progress: Progress | None = None, reference=None, proxy=None,
                      attackers: tuple[str, ...] | None = None, original=None) -> dict[str, Any]:
    """The type II attack of :mod:`harden.evaluation.adaptive` beside its detector-blind baseline (lam = 0), scored by ``scorer``.

    Rows: ``type_i`` (lam 0: its ``fooled`` is the undefended classifier's success at this budget),
    ``type_ii`` (the key-known attacker, judged in the loop by ``scorer`` itself) and ``key_unknown`` (its own
    model of the detector in the loop: the key-unknown surrogates, or ``proxy``'s).  Rates are over the inputs
    the scorer classifies correctly: ``fooled`` (misclassified after the attack), ``evaded`` (no combined
    ``alarm``), ``success`` (both), and per method the fraction that evades that method's own alarm.  With
    ``attackers`` None both type II rows are made, and a key-unknown attacker this bundle cannot have (e.g.
    mismatch without a proxy) is recorded as skipped with the reason; named explicitly, it is an error.
    ``original``: the user's classifier before a method fine-tuned it; the same lam 0 attack on it gives row
    ``original`` (its ``fooled``, over the inputs it classifies correctly), the robustness the user started from.
    """
    from harden.evaluation.adaptive import ATTACKERS, KEY_KNOWN, KEY_UNKNOWN, adaptive_attack

    x, y = _first(np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int64), limit)
    say = progress or silent
    clean = _score(scorer, x, num_classes, "the clean inputs")
    correct = clean["logits"].argmax(axis=1) == y
    explicit = attackers is not None
    attackers = tuple(attackers) if explicit else ATTACKERS
    unknown = [a for a in attackers if a not in ATTACKERS]
    if unknown or not attackers:
        raise HardenError(f"--adaptive-attacker {', '.join(unknown) or '(none)'} is not one of {', '.join(ATTACKERS)}")
    if proxy is not None and KEY_UNKNOWN not in attackers:
        raise HardenError("--adaptive-proxy models a key-unknown attacker; add --adaptive-attacker key-unknown")

    def judge(batch: np.ndarray):
        out = _score(scorer, batch, num_classes, "the adaptive examples")
        return out["logits"].argmax(axis=1), out["alarm"]

    result: dict[str, Any] = {"n": len(x), "n_correct": int(correct.sum()), "eps": settings.eps, "norm": settings.norm,
                              "steps": settings.steps, "lams": list(settings.lams), "supports": list(settings.supports),
                              "step_rules": list(settings.step_rules), "step_factors": list(settings.step_factors),
                              "kappa": settings.kappa, "surrogate": dict(settings.surrogate), "proxy": proxy is not None}
    rows = [("type_i", KEY_KNOWN, (0.0,), ("all",))]
    rows += [("type_ii", KEY_KNOWN, settings.lams, settings.supports)] if KEY_KNOWN in attackers else []
    rows += [("key_unknown", KEY_UNKNOWN, settings.lams, settings.supports)] if KEY_UNKNOWN in attackers else []
    if proxy is None and KEY_UNKNOWN in attackers and KEY_KNOWN in attackers and not _keyed(hardened):
        rows = [r for r in rows if r[0] != "key_unknown"]   # nothing keyed: the same attacker twice
        same_as_known = True
    else:
        same_as_known = False
    # restarts per row: the fraction done follows the work, not the row count (type_i is one restart)
    work = [len(lams) * len(supports) for _, _, lams, supports in rows] + ([1] if original is not None else [])
    total = float(sum(work))
    for i, (label, attacker, lams, supports) in enumerate(rows):
        say(f"adaptive attack ({label}) on {len(x)} inputs", sum(work[:i]) / total)
        start = time.perf_counter()
        try:
            attack = adaptive_attack(hardened, x, y, replace(settings, attacker=attacker), input_range=input_range,
                                     lams=lams, supports=supports, judge=judge, reference=reference,
                                     proxy=proxy if attacker == KEY_UNKNOWN else None)
        except HardenError as exc:
            if explicit or attacker != KEY_UNKNOWN:
                raise
            result[label] = {"skipped": str(exc)}
            continue
        adv = _score(scorer, attack["x_adv"], num_classes, f"the {label} examples")
        fooled = adv["logits"].argmax(axis=1) != y
        quiet = ~adv["alarm"]
        result["methods"] = attack["methods"] if label != "key_unknown" or proxy is None else result.get("methods", attack["methods"])
        result[label] = {
            "fooled": _rate(fooled[correct]),
            "evaded": _rate(quiet[correct]),
            "success": _rate((fooled & quiet)[correct]),
            "evaded_per_method": {m: _rate(~adv[m + ALARM_SUFFIX][correct]) for m in method_names(adv)},
            "mean_linf": _mean(np.abs(attack["x_adv"] - x).reshape(len(x), -1).max(axis=1)[correct]) if len(x) else None,
            "mean_l2": _mean(np.linalg.norm((attack["x_adv"] - x).reshape(len(x), -1), axis=1)[correct]) if len(x) else None,
            "seconds": time.perf_counter() - start,
        }
    if original is not None:
        say(f"adaptive attack (undefended original) on {len(x)} inputs", sum(work[:-1]) / total)
        start = time.perf_counter()
        result["original"] = _original_row(hardened, original, x, y, settings, input_range)
        result["original"]["seconds"] = time.perf_counter() - start
    if same_as_known:
        result["key_unknown"] = {**result["type_ii"], "same_as": "type_ii"}
    if "type_i" in result and result["type_i"].get("fooled") is not None:
        base = result["type_i"]["fooled"]
        for label in ("type_ii", "key_unknown"):
            row = result.get(label)
            if row and row.get("success") is not None:
                row["gain"] = base - row["success"]   # what the detector removes against this attacker
    say("done", 1.0)
    return _jsonable(result)
