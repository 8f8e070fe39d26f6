"""The report as ONE self-contained HTML file: the report's JSON in tables, its figures as inline PNG (base64).

Nothing is fetched when the file is opened: no scripts, no web fonts, no external style sheets or images.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Callable, Iterable

from harden.report import plots

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d2126; background: #fafbfc; line-height: 1.45; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 0 0 10px; border-bottom: 1px solid #d8dde3; padding-bottom: 4px; }
section { background: #fff; border: 1px solid #e1e5ea; border-radius: 6px; padding: 16px 20px; margin: 18px 0; }
nav a { margin-right: 14px; color: #2456a6; text-decoration: none; }
.meta { color: #5a6470; font-size: 0.92em; }
.note { color: #5a6470; font-size: 0.92em; margin: 8px 0; }
.statement { background: #f1f6ff; border-left: 3px solid #2456a6; padding: 6px 10px; margin: 10px 0; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid #d8dde3; padding: 3px 9px; }
th { background: #f0f2f5; font-weight: 600; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 6px 0 12px; }
dl.facts dt { color: #5a6470; }
dl.facts dd { margin: 0; }
img.figure { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
code { font-size: 0.92em; }
"""

SECTIONS = (("summary", "Method summary"), ("calibration", "Calibration"), ("roc", "ROC curves"),
            ("strength", "Detection against attack strength"), ("certified", "Certified fraction against eps"),
            ("placement", "CTT trap placement"), ("latency", "Latency"))


# ---------------------------------------------------------------------------------------------- formatting


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sig(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _table(table_id: str, header: list[str], rows: Iterable[list], caption: str | None = None) -> str:
    """Cells given as str are text; cells given as (text,) are numbers (right-aligned)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="n">{escape(c[0])}</td>' if isinstance(c, tuple) else f"<td>{escape(str(c))}</td>"
                        for c in row)
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table id="{table_id}">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _image(fig, alt: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    return f'<img class="figure" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _skipped(section: dict) -> str | None:
    return _note(f"Not available: {section['skipped']}") if "skipped" in section else None


# ---------------------------------------------------------------------------------------------- sections


def _summary(report: dict) -> str:
    s = report["summary"]
    data = s["data"]
    sizes = ", ".join(f"{k} {data['sizes'][k]}" for k in ("train", "calibration", "test") if k in (data.get("sizes") or {}))
    policy = s["policy"]
    facts = [
        ("methods", ", ".join(m["name"] for m in s["methods"])),
        ("policy", f"{policy['text']}: the alarm fires when {policy['k']} of {policy['methods']} method(s) alarm"),
        ("key fingerprint", s["key_fingerprint"] or "-"),
        ("data", f"{data['name']}: seed {data['seed']}, {sizes}"),
        ("split fingerprint", (data.get("fingerprint") or "-")[:16]),
        ("input", f"{'x'.join(map(str, s['input']['shape']))} in {s['input']['range']}, {s['num_classes']} classes"),
        ("classifier", "fine-tuned by a method (the original weights are kept for comparison)" if s["finetuned"]
         else "weights as given"),
        ("box eps (CTT)", sig(s["eps"]) if s["eps"] else "-"),
        ("bundle", f"{s['bundle_id']}, created {s['created']} by harden {s['harden']}"),
    ]
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts)
    rows = [[m["name"], ", ".join(m["sites"]) or "-", m["detector"], (sig(m["threshold"]),),
             "; ".join(f"{k}={v}" for k, v in m["settings"].items()) or "-"] for m in s["methods"]]
    return (f'<dl class="facts">{dl}</dl>' +
            _table("methods-table", ["method", "sites", "detector", "threshold", "settings"], rows))


def _calibration(report: dict) -> str:
    c = report["calibration"]
    rows = [[r["detector"], (pct(r["calibration_fpr"]),), (pct(r["test_fpr"]),)] for r in c["rows"]]
    statement = c["statement"] or "This bundle records no calibration confidence statement."
    accuracy = (f"Test accuracy {pct(c['test_accuracy'])} (original model {pct(c['original_test_accuracy'])}), "
                "on the whole test split.")
    return (_table("calibration-table", ["detector", "calibration FPR", "test FPR"], rows,
                   caption=f"FPR target {pct(c['fpr_target'])}") +
            f'<p class="statement">{escape(statement)}</p>' + _note(accuracy))


def _roc(report: dict) -> str:
    ev = report["evaluation"]
    policy = report["summary"]["policy"]["text"]
    labels = ev["roc_attacks"]
    rows = [r for r in ev["rows"] if r["attack"] in labels]
    detectors = [d for d in (rows[0]["roc_auc"] if rows else {}) if d != plots.COMBINED]
    header = ["attack", "attacked", "accuracy", "detected", "detected (fooled)", "mean L2", "mean L-inf",
              "AUC combined"] + [f"AUC {d[:-len('.score')]}" for d in detectors]
    body = [["no attack", (str(ev["n_clean"]),), (pct(ev["clean_accuracy"]),), (pct(ev["clean_fpr"]),),
             "-", "-", "-", "-"] + ["-" for _ in detectors]]
    for r in rows:
        body.append([r["attack"], (str(r["n_correct"]),), (pct(r["accuracy"]),), (pct(r["detection_rate"]),),
                     (pct(r["detection_rate_successful"]),), (num(r["mean_l2"]),), (num(r["mean_linf"]),),
                     (num(r["roc_auc"].get(plots.COMBINED)),)] + [(num(r["roc_auc"].get(d)),) for d in detectors])
    text = (f"{ev['n_clean']} inputs of the {report['report']['settings']['split']} split, attacked through the "
            f"classifier and judged by the exported graph ({report['report']['graph']}). 'detected' counts the alarm "
            "among the attacked inputs that were classified correctly before the attack ('attacked'); 'detected "
            "(fooled)' among those the attack also fooled; the 'no attack' row gives clean accuracy and the clean "
            "false-positive rate. AUC: the score's ROC area, clean against attacked.")
    figure = _image(plots.roc_figure(ev, labels, policy), "ROC curves per attack") if rows else \
        _note("No attack named for this section.")
    return _note(text) + _table("roc-table", header, body) + figure


def _strength(report: dict) -> str:
    series = report["strength"]
    if not series:
        return _note("No --strength-attack: this section is empty.")
    policy = report["summary"]["policy"]["text"]
    parts = [_image(plots.strength_figure(series, report["evaluation"]["clean_fpr"], policy),
                    "detection against attack strength")]
    tables = []
    for i, s in enumerate(series):
        methods = sorted(s["per_method_detection"]) if len(s["per_method_detection"]) > 1 else []
        header = ["eps", "accuracy", "detected", "detected (fooled)"] + [f"detected, {m}" for m in methods]
        rows = [[(sig(e),), (pct(a),), (pct(d),), (pct(f),)] + [(pct(s["per_method_detection"][m][j]),) for m in methods]
                for j, (e, a, d, f) in enumerate(zip(s["eps"], s["accuracy"], s["detection_rate"],
                                                     s["detection_rate_successful"]))]
        tables.append(_table(f"strength-table-{i}", header, rows, caption=s["attack"]))
    return "".join(parts) + f'<div class="row">{"".join(tables)}</div>'


def _certified(report: dict) -> str:
    cert = report["certification"]
    skipped = _skipped(cert)
    if skipped:
        return skipped
    series = cert["series"]
    rows = [[(sig(e),), (pct(series["hardened"]["robust"][j]),), (pct(series["hardened"]["detect_or_robust"][j]),),
             (pct(series["hardened"]["always_alarm"][j]),), (pct(series["original"]["robust"][j]),)]
            for j, e in enumerate(series["eps"])]
    notes = [f"{cert['samples']} {cert['split']} samples; bounds: {cert['bounds']}. Robust: the label is the same "
             "everywhere in the L-inf box of radius eps. Detect-or-robust: every input of the box keeps the label or "
             "raises the CTT alarm. The original model has no alarm: its detect-or-robust fraction is its robust one."]
    if not report["summary"]["finetuned"]:
        notes.append("No method fine-tuned the classifier: the hardened and original classifiers are the same model, "
                     "so their robust fractions coincide.")
    if cert.get("traps"):
        notes.append(cert["note"][:1].upper() + cert["note"][1:] + ".")
    else:
        notes.append("No CTT method in this bundle: no traps, so detect-or-robust equals robust for both models.")
    if cert.get("interval_only"):
        notes.append(f"No linear relaxation for {', '.join(cert['interval_only'])}: those nodes' intervals stand in.")
    return (_image(plots.certified_figure(cert), "certified fraction against eps") +
            _table("certified-table", ["eps", "hardened robust", "hardened detect-or-robust", "hardened always alarms",
                                       "original robust"], rows) + "".join(_note(n) for n in notes))


def _placement(report: dict) -> str:
    cert = report["certification"]
    skipped = _skipped(cert)
    if skipped:
        return skipped
    if not cert.get("traps"):
        return _note("No CTT method in this bundle: there are no traps to place.")
    results = sorted(cert["results"].items(), key=lambda item: float(item[0]))
    eps_texts = [text for text, _ in results]
    first = results[0][1]["placement"]
    upper = [[p["site"], (str(p["neurons"]),), (num(p["natural_below"], 4),)] +
             [(num(result["placement"][i]["upper_reaches"], 4),) for _, result in results] for i, p in enumerate(first)]
    lower = [[p["site"]] + [(num(result["placement"][i]["lower_reaches"], 4),) for _, result in results]
             for i, p in enumerate(first)]
    text = ("Per CTT site, fractions over samples x masked neurons (CTT paper, section 3.3): natural activation <= T "
            "(natural inputs stay quiet); the upper bound over the eps-box reaches T (sub-optimal placement: a "
            "perturbation can fire the trap, so every detection is adversarial); the lower bound reaches T (optimal: "
            "every perturbation of the box fires it).")
    return (_note(text) +
            _table("placement-upper-table", ["site", "neurons", "natural <= T"] + [f"eps {e}" for e in eps_texts],
                   upper, caption="hi >= T (sub-optimal placement), per eps") +
            _table("placement-lower-table", ["site"] + [f"eps {e}" for e in eps_texts], lower,
                   caption="lo >= T (optimal placement), per eps"))


def _latency(report: dict) -> str:
    lat = report["latency"]
    rows = [[(batch,), (str(row["rounds"]),), (num(row["plain_ms"], 3),), (num(row["hardened_ms"], 3),),
             (num(row["ratio"], 2),)] for batch, row in lat["batches"].items()]
    text = (f"Median milliseconds per call in onnxruntime ({lat['provider']}, {lat['threads']} intra-op thread(s)): "
            "the hardened graph against the plain classifier exported alone, timed alternately in one process on "
            "inputs of the split. These are this machine's figures at the time of the report.")
    return _note(text) + _table("latency-table", ["batch", "calls", "plain ms", "hardened ms", "ratio"], rows)


RENDERERS: dict[str, Callable[[dict], str]] = {
    "summary": _summary, "calibration": _calibration, "roc": _roc, "strength": _strength,
    "certified": _certified, "placement": _placement, "latency": _latency,
}


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "default"
    return "default" if value is None else str(value)


def render(report: dict, progress: Callable[[str, float], None] = lambda m, f: None) -> str:
    """The whole HTML document for a report's JSON."""
    meta = report["report"]
    title = f"harden report: {Path(meta['target']).name if meta['target'] else 'bundle'}"
    nav = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in SECTIONS)
    body = []
    for i, (key, name) in enumerate(SECTIONS):
        progress(f"drawing {name.lower()}", i / len(SECTIONS))
        body.append(f'<section id="{key}"><h2>{escape(name)}</h2>{RENDERERS[key](report)}</section>')
    settings = "; ".join(f"{k} {_setting(v)}" for k, v in meta["settings"].items())
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body><main>'
        f"<h1>{escape(title)}</h1>"
        f'<p class="meta">made {escape(meta["created"])} by harden {escape(meta["harden"])}; '
        f"graph judged: {escape(meta['graph'])}; certified eps: {escape(_setting(meta['certify_eps']))}</p>"
        f"<nav>{nav}</nav>{''.join(body)}"
        f'<p class="meta">settings: {escape(settings)}</p></main></body></html>\n'
    )
