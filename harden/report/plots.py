"""The report's figures, drawn with matplotlib from the report's JSON (never from anything else).

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display), so plotting works on a headless server and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import io
import math

import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harden.errors import HardenError
from harden.io.atomic import atomic_write_bytes
from harden.report.series import certified_series

COMBINED = "score"
PANEL = (4.2, 4.6)   # inches per panel, its legend beneath
COLUMNS = 3          # panels per row: the report shows figures about 1200 px wide, near 1:1
DPI = 100
METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def _grid(figure_or_sub, panels: int, columns: int | None = None):
    """``panels`` axes in rows of at most COLUMNS (``columns``: exactly that many per row, the rest hidden)."""
    cols = columns or min(panels, COLUMNS)
    rows = math.ceil(panels / cols)
    axes = figure_or_sub.subplots(rows, cols, squeeze=False)
    for extra in axes.flat[panels:]:
        extra.set_visible(False)
    return list(axes.flat[:panels])


def _figure(panels: int) -> Figure:
    rows = math.ceil(panels / COLUMNS)
    cols = min(max(panels, 1), COLUMNS)
    return Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows + 0.4), layout="constrained")


def _title(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure is narrow)."""
    import textwrap

    width = fig.get_figure().get_size_inches()[0] if hasattr(fig, "get_figure") else fig.get_size_inches()[0]
    fig.suptitle("\n".join(textwrap.wrap(text, max(30, int(width * 11)))), fontsize=10)


def _method_colour(methods: list[str], name: str) -> str:
    return METHOD_COLOURS[methods.index(name) % len(METHOD_COLOURS)]


def _detector_label(detector: str, policy: str | None) -> str:
    if detector == COMBINED:
        return f"combined ({policy})" if policy else "combined"
    return detector[: -len(".score")]


# ---------------------------------------------------------------------------------------------- ROC


def draw_roc(fig, evaluation: dict, labels: list[str] | None = None, policy: str | None = None,
             columns: int | None = None) -> None:
    """One panel per attack: the ROC curve of every detector (clean inputs against the originally-correct attacked
    ones), the combined score in black, and the shipped alarm's operating point."""
    rows = [r for r in evaluation["rows"] if labels is None or r["attack"] in labels]
    if not rows:
        raise HardenError("no attack results to draw ROC curves from")
    methods = sorted({d[: -len(".score")] for r in rows for d in r.get("roc_curves", {}) if d != COMBINED})
    _title(fig, f"ROC: {evaluation['n_clean']} clean inputs (negatives) against the attacked ones that were "
                "classified correctly (positives)")
    for ax, row in zip(_grid(fig, len(rows), columns), rows):
        curves = row.get("roc_curves") or {}
        if not curves:
            raise HardenError(f"attack {row['attack']}: the evaluation holds no ROC curves (made without curves=True)")
        chance = np.concatenate([[0.0], np.geomspace(min(1.0, 0.5 / max(1, evaluation["n_clean"])), 1.0, 200)])
        ax.plot(chance, chance, color="0.8", linestyle="--", linewidth=0.8, label="chance")
        # a method whose curve is the combined one (e.g. the only method) is drawn once, as the combined curve
        same = [d for d in curves if d != COMBINED and curves[d] is not None and curves[d] == curves.get(COMBINED)]
        for detector in [d for d in curves if d != COMBINED and d not in same] + [COMBINED]:
            curve = curves.get(detector)
            if curve is None:
                continue
            auc = row["roc_auc"].get(detector)
            name = _detector_label(detector, policy)
            if detector == COMBINED and same:
                name = " = ".join([_detector_label(d, policy) for d in same] + [name])
            text = f"{name} (AUC {auc:.3f})" if auc is not None else name
            if detector == COMBINED:
                ax.plot(*_on_log_axis(curve), color="black", linewidth=1.8, label=text)
            else:
                ax.plot(*_on_log_axis(curve), color=_method_colour(methods, name), linewidth=1.2, label=text)
        if row["detection_rate"] is not None:
            ax.plot([evaluation["clean_fpr"]], [row["detection_rate"]], marker="o", color="crimson", linestyle="none",
                    label=f"alarm as shipped ({100 * evaluation['clean_fpr']:.1f}% FPR, "
                          f"{100 * row['detection_rate']:.1f}% detected)")
        ax.set_title(f"{row['attack']} ({row['n_correct']} attacked)", fontsize=9)
        _fpr_axis(ax, evaluation["n_clean"])
        ax.set_ylim(0.0, 1.01)
        ax.set_ylabel("detection rate (attacked)")
        ax.grid(alpha=0.3)
        _legend_below(ax)


# ---------------------------------------------------------------------------------------------- strength


def draw_strength(fig, series: list[dict], clean_fpr: float | None = None, policy: str | None = None,
                  columns: int | None = None) -> None:
    """One panel per attack: detection and accuracy under attack against the attack's eps."""
    if not series:
        raise HardenError("no attack was run at several eps: nothing to draw against attack strength")
    _title(fig, "detection (among the inputs classified correctly before the attack) and accuracy under attack, "
                "against the attack's eps")
    for ax, s in zip(_grid(fig, len(series), columns), series):
        eps = s["eps"]
        methods = sorted(s["per_method_detection"])
        _line(ax, eps, s["detection_rate"], color="black", marker="o", linewidth=1.8,
              label=f"detected, {_detector_label(COMBINED, policy)}")
        _line(ax, eps, s["detection_rate_successful"], color="black", marker="x", linestyle="--", linewidth=1.0,
              label="detected among the fooled")
        if len(methods) > 1:
            for m in methods:
                _line(ax, eps, s["per_method_detection"][m], color=_method_colour(methods, m), marker=".",
                      linewidth=1.0, label=f"detected, {m}")
        _line(ax, eps, s["accuracy"], color="tab:gray", marker="s", linestyle=":", linewidth=1.2,
              label="accuracy under attack")
        if clean_fpr is not None:
            ax.axhline(clean_fpr, color="crimson", linewidth=0.8, linestyle="-.", label="false-positive rate (clean)")
        ax.set_title(s["attack"], fontsize=9)
        _eps_axis(ax, eps)
        ax.set_xlabel("attack eps (input units)")
        ax.set_ylabel("fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        _legend_below(ax)


def _on_log_axis(curve: dict, points: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's points, with points added along each sloped segment: the curve is linear between its
    points in FPR, which a log axis would draw as a straight line in log space (ties give long such segments)."""
    fpr, tpr = np.asarray(curve["fpr"], dtype=float), np.asarray(curve["tpr"], dtype=float)
    xs, ys = [fpr[:1]], [tpr[:1]]
    for x0, y0, x1, y1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:]):
        if x1 > x0 and y1 != y0:
            # from FPR 0 the segment runs through the axis' linear part (below 1/n >= 1e-4), then its log part
            x = np.geomspace(x0, x1, points)[1:] if x0 > 0 else np.geomspace(min(x1, 1e-4), x1, points)
            xs.append(x)
            ys.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        else:
            xs.append([x1])
            ys.append([y1])
    return np.concatenate(xs), np.concatenate(ys)


def _fpr_axis(ax, n_clean: int) -> None:
    """False-positive rates on a log scale, linear below 1/n (the smallest non-zero rate n clean inputs can show),
    so that FPR 0 stays on the axis: a good detector's curve lives at FPRs of a few percent, which a linear axis
    squeezes into its first tick."""
    floor = 1.0 / max(1, n_clean)
    ax.set_xscale("symlog", linthresh=floor, linscale=0.3)
    ax.set_xlim(0.0, 1.25)   # a margin past FPR 1, where a curve's last (vertical) segment would hide in the frame
    ticks = [0.0] + [t for t in (0.001, 0.01, 0.1, 1.0) if t >= floor]
    ax.set_xticks(ticks, ["0"] + [f"{t:g}" for t in ticks[1:]])
    ax.set_xlabel("false-positive rate (clean, log scale)")


def _eps_axis(ax, eps: list[float]) -> None:
    """A log eps axis ticked at the grid's values when the grid spans a factor of ten or more."""
    if len(eps) > 1 and min(eps) > 0 and max(eps) / min(eps) >= 10:
        ax.set_xscale("log")
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()


def _legend_below(ax) -> None:
    """Under the panel, where it hides no curve."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1, frameon=False)


def _line(ax, xs, ys, **style) -> None:
    """A line through the defined points (a rate over an empty set is None)."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], **style)


# ---------------------------------------------------------------------------------------------- certificates


def draw_certified(fig, certification: dict) -> None:
    """Certified fraction against eps: robust and detect-or-robust, hardened against original."""
    series = certification.get("series") or certified_series(certification)
    eps = series["eps"]
    ax = fig.subplots()
    # the original first and wider, so that the hardened lines stay visible where the two coincide
    styles = {("original", "robust"): dict(color="0.65", marker="s", linestyle="-", linewidth=3.0),
              ("hardened", "robust"): dict(color="tab:blue", marker="o", linestyle="-", linewidth=1.5),
              ("hardened", "detect_or_robust"): dict(color="tab:red", marker="^", linestyle="--", linewidth=1.5)}
    for (model, kind), style in styles.items():
        if kind == "detect_or_robust" and not certification.get("traps"):
            continue   # no CTT method: detect-or-robust equals robust
        label = f"{model}: {'detect-or-robust' if kind == 'detect_or_robust' else 'robust'}"
        ax.plot(eps, series[model][kind], label=label, **style)
    _eps_axis(ax, eps)
    ax.set_xlabel(series.get("axis", "eps (L-inf box radius, input units)"))
    ax.set_ylabel("certified fraction of samples")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{certification['samples']} {certification['split']} samples; bounds: {certification['bound_method']}",
                 fontsize=9)


# ---------------------------------------------------------------------------------------------- output


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)   # the Agg canvas: no pyplot, no display
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def roc_figure(evaluation: dict, labels: list[str] | None = None, policy: str | None = None) -> Figure:
    rows = [r for r in evaluation["rows"] if labels is None or r["attack"] in labels]
    fig = _figure(len(rows))
    draw_roc(fig, evaluation, labels, policy)
    return fig


def strength_figure(series: list[dict], clean_fpr: float | None = None, policy: str | None = None) -> Figure:
    fig = _figure(len(series))
    draw_strength(fig, series, clean_fpr, policy)
    return fig


def certified_figure(certification: dict) -> Figure:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    draw_certified(fig, certification)
    return fig


def evaluation_figure(evaluation: dict, series: list[dict], policy: str | None = None) -> Figure:
    """``harden evaluate --plot``: the ROC panels of every attack and, when attacks ran at several eps, the
    strength panels beneath them (the report's two sections, in one image)."""
    panels = len(evaluation["rows"])
    if not panels:
        raise HardenError("no attack results to plot")
    if not series:
        return roc_figure(evaluation, policy=policy)
    columns = min(max(panels, len(series)), COLUMNS)
    roc_rows, strength_rows = math.ceil(panels / columns), math.ceil(len(series) / columns)
    fig = Figure(figsize=(PANEL[0] * columns, PANEL[1] * (roc_rows + strength_rows) + 0.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[roc_rows, strength_rows])
    draw_roc(top, evaluation, policy=policy, columns=columns)
    draw_strength(bottom, series, evaluation["clean_fpr"], policy, columns=columns)
    return fig


def write_png(fig: Figure, path) -> None:
    atomic_write_bytes(path, png_bytes(fig))
