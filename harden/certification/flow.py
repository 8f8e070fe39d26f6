"""The flow-field threat for ``harden certify --threat flow:delta=D[,tv=T]`` (thesis 001, section 4).

:class:`FlowThreat` is an :class:`~harden.certification.certify.InputSet`: the certificates of
:func:`~harden.certification.certify.certify_samples` then hold for every image ``warp(x, r)`` with each flow
component in [-delta, delta] and, if given, TV(r) <= tv (:mod:`harden.core.flow`).  The input box is exact
(:mod:`harden.bounds.flow_box`); the TV budget narrows the first affine layers (:mod:`harden.bounds.flow_tv`).
:meth:`FlowThreat.draw` samples flows inside the budget for ``--check``: the zero flow, the four extreme
translations, then random fields of several kinds (independent vertices and uniform values, smooth fields,
sparse moves of a few pixels), each projected into the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.flow_box import flow_box
from harden.bounds.flow_tv import CELLS, LEVELS, FirstAffine, first_affine_layers, tv_clamps
from harden.bounds.interval import Interval
from harden.core.flow import check_budget, project, warp
from harden.errors import HardenError

THREAT_HELP = "linf (the L-inf box of --eps; the default) or flow:delta=D[,tv=T] (per-pixel flow <= D pixels, total variation <= T)"


@dataclass
class FlowThreat:
    delta: float
    tv: float | None = None
    cells: int = CELLS
    levels: tuple[float, ...] = LEVELS
    _layers: dict = field(default_factory=dict, repr=False)   # per graph: its first affine layers (found once)

    def __post_init__(self):
        if self.delta is None:
            raise HardenError("flow threat: delta is required (a TV budget alone allows any translation)")
        check_budget(self.delta, self.tv)

    def label(self) -> str:
        return f"flow:delta={self.delta:g}" + (f",tv={self.tv:g}" if self.tv is not None else "")

    # -- InputSet ---------------------------------------------------------------------------------
    def box(self, x: torch.Tensor, rows: slice) -> Interval:
        return flow_box(x, self.delta)

    def layers(self, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[FirstAffine]:
        key = (id(gm), tuple(input_shape))
        held = self._layers.get(key)
        if held is None or held[0] is not gm:     # the graph is kept with its entry: an id is never reused wrongly
            held = self._layers[key] = (gm, first_affine_layers(gm, tuple(input_shape)))
        return held[1]

    def clamps(self, gm: fx.GraphModule, x: torch.Tensor, rows: slice) -> dict[str, Callable]:
        if self.tv is None:
            return {}
        return tv_clamps(gm, x, self.delta, self.tv, cells=self.cells, levels=self.levels,
                         layers=self.layers(gm, tuple(x.shape[1:])))

    def draw(self, x: torch.Tensor, rows: slice, n_points: int, generator: torch.Generator) -> torch.Tensor:
        flows = sample_flows(x.shape[0], x.shape[2], x.shape[3], n_points, self.delta, self.tv, generator)
        flows = flows.to(x.device, x.dtype)
        n = x.shape[0]
        moved = warp(x.repeat_interleave(n_points, dim=0), flows.reshape((n * n_points, 2) + tuple(x.shape[2:])))
        return moved.reshape((n, n_points) + tuple(x.shape[1:]))


def sample_flows(n: int, h: int, w: int, n_points: int, delta: float, tv: float | None,
                 generator: torch.Generator) -> torch.Tensor:
    """[n, n_points, 2, h, w] flows inside the budget: zero, the four corner translations, then a mix of
    random vertex fields (every component +-delta), uniform fields, smooth fields and sparse moves."""
    out = torch.zeros((n, n_points, 2, h, w))
    fixed = [(0.0, 0.0), (delta, delta), (delta, -delta), (-delta, delta), (-delta, -delta)]
    for i, (a, b) in enumerate(fixed[:n_points]):
        out[:, i, 0], out[:, i, 1] = a, b
    for i in range(len(fixed), n_points):
        kind = i % 4
        shape = (n, 2, h, w)
        if kind == 0:
            field_ = (torch.rand(shape, generator=generator) < 0.5).float() * 2 - 1
        elif kind == 1:
            field_ = torch.rand(shape, generator=generator) * 2 - 1
        elif kind == 2:
            coarse = torch.rand((n, 2, max(2, h // 4), max(2, w // 4)), generator=generator) * 2 - 1
            field_ = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
            field_ = field_ / field_.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        else:
            field_ = torch.zeros(shape)
            picks = max(1, math.ceil(0.02 * h * w))
            idx = torch.randint(0, h * w, (n, picks), generator=generator)
            signs = (torch.rand((n, 2, picks), generator=generator) < 0.5).float() * 2 - 1
            flat = field_.reshape(n, 2, h * w)
            flat.scatter_(2, idx.unsqueeze(1).expand(n, 2, picks), signs)
            field_ = flat.reshape(shape)
        shift = torch.rand((n, 2, 1, 1), generator=generator) * 2 - 1     # a random common translation too
        out[:, i] = project(field_ * delta * 0.5 + shift * delta * 0.5, delta, tv)
    return out


def parse_threat(text: str) -> FlowThreat | None:
    """``linf`` -> None (the L-inf box of --eps); ``flow:delta=D[,tv=T]`` -> a :class:`FlowThreat`."""
    name, sep, rest = (text or "").strip().partition(":")
    name = name.strip().lower()
    if name == "linf" and not rest.strip():
        return None
    if name != "flow":
        raise HardenError(f"--threat {text!r} is not one of: {THREAT_HELP}")
    values: dict[str, float] = {}
    for item in rest.split(",") if rest.strip() else []:
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("delta", "tv"):
            raise HardenError(f"--threat {text!r}: {item.strip()!r} is not delta=D or tv=T")
        if key in values:
            raise HardenError(f"--threat {text!r}: {key} is given twice")
        try:
            values[key] = float(raw)
        except ValueError:
            raise HardenError(f"--threat {text!r}: {key}={raw.strip()!r} is not a number") from None
    if "delta" not in values:
        raise HardenError(f"--threat {text!r}: delta=D is required (a TV budget alone allows any translation)")
    return FlowThreat(values["delta"], values.get("tv"))
