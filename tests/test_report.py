"""harden report: one self-contained HTML file whose tables and figures are the JSON's; --plot; bad input."""

from __future__ import annotations

import base64
import json
import struct
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from harden.cli.app import app

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# small enough for CI: a few seconds of attacks, certificates and timing on the tiny digits model
REPORT_ARGS = ("--limit", 60, "-a", "fgsm:eps=0.1", "-a", "deepfool:max_iter=5", "--strength-attack", "fgsm",
               "--strength-eps", 0.05, "--strength-eps", 0.1, "--strength-eps", 0.3, "--certify-eps", 0.001,
               "--certify-eps", 0.01, "--certify-limit", 40, "--latency-rounds", 5)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, pattern):
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert pattern in lines[0], lines[0]


class _Page(HTMLParser):
    """Tables (by id: rows of cell texts, header row first), images' src, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"anonymous-{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def body(page: _Page, table: str) -> list[list[str]]:
    return page.tables[table][1:]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])   # the IHDR chunk: width, height


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_hardened):
    from harden.bundle.archive import save_bundle

    path = tmp_path_factory.mktemp("report") / "tiny.hardened"
    save_bundle(tiny_hardened, path)
    return path


@pytest.fixture(scope="module")
def exported(bundle, tiny_hardened):
    """The ONNX file beside its bundle: the commands judge it instead of exporting the bundle again each time."""
    from harden.export import export_onnx

    path = bundle.with_suffix(".onnx")
    export_onnx(tiny_hardened, path, source=bundle)
    return path


@pytest.fixture(scope="module")
def rendered(exported, one_thread):
    out = exported.parent / "report.html"
    result = invoke("report", exported, "-o", out, *REPORT_ARGS, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    page = _Page()
    page.text = out.read_text()
    page.feed(page.text)
    return figures, page, out


def test_the_report_is_one_self_contained_file(rendered, exported):
    figures, page, out = rendered
    assert figures["output"] == str(out)
    assert figures["report"]["graph"] == str(exported)   # judged and timed: the shipped file
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert value.startswith(("data:image/png;base64,", "#")) or not value, value
    # one image per figure section: ROC, strength, certificates
    assert len(page.images) == 3
    for src in page.images:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        width, height = png_size(data)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (width, height)
        from PIL import Image
        import io

        Image.open(io.BytesIO(data)).verify()   # a complete, decodable PNG


def test_summary_and_calibration_tables_are_the_manifests(rendered, bundle):
    from harden.bundle.archive import read_manifest

    figures, page, _ = rendered
    manifest = read_manifest(bundle)
    (method,) = body(page, "methods-table")
    assert method[:3] == ["ctt-lite", ", ".join(manifest["methods"][0]["sites"]), "in graph"]
    assert method[3] == f"{manifest['methods'][0]['threshold']:.4g}"
    metrics = manifest["metrics"]
    assert body(page, "calibration-table") == [
        ["ctt-lite", pct(metrics["calibration_fpr_per_method"]["ctt-lite"]), pct(metrics["test_fpr_per_method"]["ctt-lite"])],
        ["combined (policy any)", pct(metrics["calibration_fpr"]), pct(metrics["test_fpr"])],
    ]
    statement = figures["calibration"]["statement"]
    assert statement.startswith("calibration: ") and escape(statement) in page.text
    assert figures["summary"]["key_fingerprint"] == manifest["key_fingerprint"]
    assert manifest["key_fingerprint"] in page.text


def test_roc_table_and_curves_match_the_json(rendered):
    figures, page, _ = rendered
    ev = figures["evaluation"]
    assert ev["roc_attacks"] == ["fgsm:eps=0.1", "deepfool:max_iter=5"]
    rows = {r["attack"]: r for r in ev["rows"]}
    table = body(page, "roc-table")
    assert table[0][:4] == ["no attack", str(ev["n_clean"]), pct(ev["clean_accuracy"]), pct(ev["clean_fpr"])]
    assert [line[0] for line in table[1:]] == ev["roc_attacks"]
    for line in table[1:]:
        row = rows[line[0]]
        assert line[1:5] == [str(row["n_correct"]), pct(row["accuracy"]), pct(row["detection_rate"]),
                             pct(row["detection_rate_successful"])]
        assert line[7] == f"{row['roc_auc']['score']:.3f}"
        curve = row["roc_curves"]["score"]
        fpr, tpr = np.array(curve["fpr"]), np.array(curve["tpr"])
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(row["roc_auc"]["score"], abs=1e-12)
        # the shipped alarm is score > 0, so (clean FPR, detection rate) lies on the combined score's ROC curve
        assert _on_curve(fpr, tpr, ev["clean_fpr"], row["detection_rate"]), (ev["clean_fpr"], row["detection_rate"])


def _on_curve(fpr, tpr, x, y, tol=1e-9) -> bool:
    for x0, y0, x1, y1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:]):
        if x0 - tol <= x <= x1 + tol:
            if x1 - x0 < tol:
                if min(y0, y1) - tol <= y <= max(y0, y1) + tol:
                    return True
            elif abs(y0 + (y1 - y0) * (x - x0) / (x1 - x0) - y) <= 1e-6:
                return True
    return False


def test_strength_table_is_the_evaluations_rows(rendered):
    figures, page, _ = rendered
    (series,) = figures["strength"]
    assert series["attack"] == "fgsm" and series["eps"] == [0.05, 0.1, 0.3]
    rows = {r["attack"]: r for r in figures["evaluation"]["rows"]}
    # fgsm:eps=0.1 is in both sections and ran once
    assert [r["attack"] for r in figures["evaluation"]["rows"]].count("fgsm:eps=0.1") == 1
    table = body(page, "strength-table-0")
    for line, label, eps in zip(table, series["labels"], series["eps"]):
        row = rows[label]
        assert row["params"]["eps"] == eps
        assert line == [f"{eps:.4g}", pct(row["accuracy"]), pct(row["detection_rate"]),
                        pct(row["detection_rate_successful"])]
    assert len(table) == 3


def test_certificate_and_placement_tables_match_the_json(rendered):
    figures, page, _ = rendered
    cert = figures["certification"]
    series = cert["series"]
    assert series["eps"] == [0.001, 0.01] and cert["samples"] == 40
    for j, line in enumerate(body(page, "certified-table")):
        h, o = series["hardened"], series["original"]
        assert line == [f"{series['eps'][j]:.4g}", pct(h["robust"][j]), pct(h["detect_or_robust"][j]),
                        pct(h["always_alarm"][j]), pct(o["robust"][j])]
        assert h["detect_or_robust"][j] >= h["robust"][j]
        assert h["robust"][j] == o["robust"][j]    # ctt-lite does not fine-tune: the same classifier
    assert series["hardened"]["robust"][0] >= series["hardened"]["robust"][1]   # a larger box certifies less
    upper, lower = body(page, "placement-upper-table"), body(page, "placement-lower-table")
    assert [line[0] for line in upper] == [t["site"] for t in cert["traps"]]
    for i, (up, low) in enumerate(zip(upper, lower)):
        first = cert["results"]["0.001"]["placement"][i]
        assert up[1:3] == [str(first["neurons"]), f"{first['natural_below']:.4f}"]
        assert up[3:] == [f"{cert['results'][e]['placement'][i]['upper_reaches']:.4f}" for e in ("0.001", "0.01")]
        assert low[1:] == [f"{cert['results'][e]['placement'][i]['lower_reaches']:.4f}" for e in ("0.001", "0.01")]


def test_latency_table_matches_the_json(rendered):
    figures, page, _ = rendered
    lat = figures["latency"]
    assert lat["threads"] == 1 and list(lat["batches"]) == ["1", "256"]
    for line, (batch, row) in zip(body(page, "latency-table"), lat["batches"].items()):
        assert line == [batch, str(row["rounds"]), f"{row['plain_ms']:.3f}", f"{row['hardened_ms']:.3f}",
                        f"{row['ratio']:.2f}"]
        assert row["plain_ms"] > 0 and row["hardened_ms"] > 0
        assert row["ratio"] == pytest.approx(row["hardened_ms"] / row["plain_ms"], rel=1e-2)


def test_sections_that_do_not_apply_say_so(rendered):
    from harden.report.html import render

    figures, _, _ = rendered
    no_ctt = json.loads(json.dumps(figures))
    no_ctt["certification"]["traps"] = []
    for result in no_ctt["certification"]["results"].values():
        result["placement"] = []
    page = render(no_ctt)
    assert "No CTT method in this bundle: there are no traps to place." in page
    assert "detect-or-robust equals robust" in page
    unavailable = json.loads(json.dumps(figures))
    unavailable["certification"] = {"skipped": "no interval bound rule for op 'layer_norm'"}
    unavailable["strength"] = []
    page = render(unavailable)
    assert page.count("Not available: no interval bound rule for op &#x27;layer_norm&#x27;") == 2
    assert "No --strength-attack" in page


def test_strength_series_groups_an_attack_run_at_several_eps():
    from harden.report.series import strength_series

    def row(label, eps, acc):
        return {"attack": label, "params": {"eps": eps}, "accuracy": acc, "detection_rate": 1 - acc,
                "detection_rate_successful": None, "per_method_detection": {"m": 0.5}}

    rows = [row("fgsm:eps=0.2", 0.2, 0.1), row("pgd:eps=0.1", 0.1, 0.3), row("fgsm:eps=0.1", 0.1, 0.5),
            row("pgd:eps=0.1,steps=20", 0.1, 0.2), row("pgd:eps=0.2,steps=20", 0.2, 0.0)]
    fgsm, pgd = strength_series(rows)
    assert fgsm["attack"] == "fgsm" and fgsm["eps"] == [0.1, 0.2] and fgsm["accuracy"] == [0.5, 0.1]
    assert pgd["attack"] == "pgd:steps=20" and pgd["labels"] == ["pgd:eps=0.1,steps=20", "pgd:eps=0.2,steps=20"]
    assert pgd["per_method_detection"] == {"m": [0.5, 0.5]}


def test_evaluate_and_certify_plot_a_png(bundle, exported, tmp_path, one_thread):
    roc = tmp_path / "roc.png"
    result = invoke("evaluate", exported, "--limit", 40, "-a", "fgsm:eps=0.05", "-a", "fgsm:eps=0.2",
                    "--plot", roc, "--json")
    assert result.exit_code == 0, result.output
    width, height = png_size(roc.read_bytes())
    assert width >= 600 and height >= 600   # two ROC panels above one strength panel
    certified = tmp_path / "certified.png"
    result = invoke("certify", bundle, "--eps", 0.001, "--eps", 0.01, "--limit", 20, "--plot", certified)
    assert result.exit_code == 0, result.output
    assert f"wrote {certified}" in result.output.replace("\n", "")
    width, height = png_size(certified.read_bytes())
    assert 300 <= width <= 2000 and 200 <= height <= 2000


def test_bad_input_is_one_line_and_no_file(bundle, exported, tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    one_line_error(invoke("report", bundle, "-o", out, "-a", "nosuch"), "nosuch")
    one_line_error(invoke("report", bundle, "-o", out, "--strength-attack", "deepfool"), "has no eps parameter")
    one_line_error(invoke("report", bundle, "-o", out, "--strength-attack", "fgsm:eps=0.1"), "--strength-eps")
    one_line_error(invoke("report", bundle, "-o", out, "--certify-eps", -1), "--certify-eps must be > 0")
    one_line_error(invoke("report", bundle, "-o", out, "--split", "validation"), "--split")
    one_line_error(invoke("report", bundle, "-o", out, "--bounds", "exact"), "exact")
    one_line_error(invoke("report", tmp_path / "none.hardened", "-o", out), "no file")
    one_line_error(invoke("report", bundle, "-o", tmp_path / "missing" / "r.html"), "does not exist")
    one_line_error(invoke("evaluate", bundle, "--limit", 10, "-a", "fgsm:eps=0.1", "--plot", tmp_path / "r.svg"),
                   "name the file *.png")
    one_line_error(invoke("evaluate", bundle, "--adaptive", "--plot", tmp_path / "r.png"), "--adaptive alone")
    one_line_error(invoke("certify", bundle, "--plot", tmp_path / "missing" / "c.png"), "does not exist")

    # a failure after the measurements leaves neither the report nor a temporary file
    from harden.errors import HardenError
    import harden.report.html

    def broken(report, progress=None):
        raise HardenError("drawing failed")

    monkeypatch.setattr(harden.report.html, "render", broken)
    cheap = ("--limit", 10, "-a", "fgsm:eps=0.1", "--strength-attack", "fgsm", "--strength-eps", 0.1,
             "--strength-eps", 0.2, "--certify-eps", 0.01, "--certify-limit", 5, "--latency-rounds", 1)
    one_line_error(invoke("report", exported, "-o", out, *cheap), "drawing failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_roc_curve_on_the_log_axis_is_the_same_piecewise_linear_curve():
    from harden.report.plots import _on_log_axis

    fpr, tpr = [0.0, 0.0, 0.002, 0.1, 0.1, 1.0], [0.0, 0.4, 0.5, 0.6, 0.9, 1.0]
    xs, ys = _on_log_axis({"fpr": fpr, "tpr": tpr})
    # the original points, in order, and nothing outside them
    position = [int(np.flatnonzero((xs == x) & (ys == y))[0]) for x, y in zip(fpr, tpr)]
    assert position == sorted(position) and position[0] == 0 and position[-1] == len(xs) - 1
    # every added point lies on its sloped segment, and each such segment is sampled densely in log FPR
    for (x0, y0, x1, y1), a, b in zip(zip(fpr, tpr, fpr[1:], tpr[1:]), position, position[1:]):
        inside = slice(a + 1, b)
        assert np.allclose(ys[inside], y0 + (y1 - y0) * (xs[inside] - x0) / (x1 - x0) if x1 > x0 else [])
        if x1 > x0 and y1 != y0:
            assert b - a > 10 and np.all(np.diff(xs[a:b + 1]) > 0)
