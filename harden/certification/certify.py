"""What bound propagation (interval or linear relaxation) guarantees about a (hardened) classifier graph (design section 6).

* :func:`placement`: per CTT trap, where its thresholds sit relative to the natural
  activations and to the eps-box bounds (paper 000, section 3.3).
* :func:`certify_samples`: per sample, *robust* (the label is constant over the
  eps-box) and *detect-or-robust* (every input of the box keeps the label or
  raises the CTT alarm).
* :func:`check_certificates`: draw points in every box, run the real model and
  report every point that contradicts a bound or a certificate.

The CLI wiring lives elsewhere; everything here is a plain function of a
GraphModule, the traps as the detector sees them and a batch of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.fx as fx

from harden.bounds import Interval, propagate, run_recorded
from harden.bounds.abstain import abstain_rows, certificate_of, crown_rows_lower, interval_rows_lower
from harden.bounds.crown import LinearBounds, check_method
from harden.bounds import lagrangian
from harden.bounds.linear import linear_parts
from harden.bounds.margin import (PRE_ACTIVATION_LIMIT, final_linear, folded_margin_lower,
                                  subtracted_margin_lower)
from harden.bounds.propagate import BoundResult, input_dependent
from harden.bounds.rules import Call
from harden.core.distributed import chunk_seed, gather, map_chunks
from harden.errors import HardenError
from harden.graph.ops import canonical_op
from harden.io.lazy import LazyImages
from harden.graph.trace import output_node


@dataclass
class Trap:
    """One CTT site as the detector sees it."""

    node: str                      # node name in gm (output of a ReLU/ReLU6)
    flat_indices: torch.Tensor     # int64 positions in the per-sample flattened activation
    thresholds: torch.Tensor       # float32, same length: alarm iff activation[idx] > threshold for any idx of any trap

    def __post_init__(self):
        self.flat_indices = torch.as_tensor(self.flat_indices, dtype=torch.int64).reshape(-1)
        self.thresholds = torch.as_tensor(self.thresholds, dtype=torch.float32).reshape(-1)
        if self.flat_indices.numel() != self.thresholds.numel():
            raise HardenError(f"trap at {self.node!r}: {self.flat_indices.numel()} indices but "
                              f"{self.thresholds.numel()} thresholds")

    def on(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flat_indices.to(device), self.thresholds.to(device=device, dtype=dtype)


@dataclass
class AbstainAlarm:
    """An abstain detector as its exported alarm sees it (:mod:`harden.methods.abstain`): the head on the logits
    layer's input ``node``, alarming when (raw - threshold) / scale > 0, raw = z_abs - max_k z_k."""

    node: str                      # the logits layer's input h (the head reads it and the logits)
    head: torch.nn.Module          # AbstainHead: .abstain (nn.Linear d -> 1), forward(h, logits) -> raw
    threshold: float               # the calibrated t: the alarm is z_abs - t > every class logit
    scale: float = 1.0

    def rows_lower(self, gm: fx.GraphModule, fold: fx.Node | None, result: BoundResult, y: torch.Tensor,
                   engine: "LinearBounds | None") -> torch.Tensor:
        """[N, 2K] lower bounds over the box of z_y - z_j, then z_abs - t - z_j (:mod:`harden.bounds.abstain`)."""
        from harden.train.abstain import logits_layer   # the training side imports the bounds; import late

        layer_node, linear, through = logits_layer(gm)
        if layer_node is not fold or through != self.node:
            raise HardenError(f"the abstain detector reads {self.node!r}, which is not the input of the classifier's "
                              "logits layer")
        h = result.nodes[self.node]
        dtype = h.lo.dtype
        A, c = abstain_rows(linear.weight.to(dtype), None if linear.bias is None else linear.bias.to(dtype),
                            self.head.abstain.weight.reshape(-1).to(h.lo.device, dtype),
                            self.head.abstain.bias.reshape(()).to(h.lo.device, dtype), y, -float(self.threshold))
        lower = interval_rows_lower(Interval(h.lo.flatten(1), h.hi.flatten(1)), A, c)
        if engine is not None:
            lower = torch.maximum(lower, crown_rows_lower(engine, result.nodes, fold, A, c))
        return lower

    def alarm(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per point, the exported alarm: not ((raw - t) / s <= 0)."""
        raw = self.head.to(h.device)(h, logits).float()
        return torch.logical_not((raw - float(self.threshold)) / float(self.scale) <= 0)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _check_inputs(gm: fx.GraphModule, traps: Sequence[Trap], x: torch.Tensor, eps, y=None) -> None:
    names = {n.name for n in gm.graph.nodes}
    missing = [t.node for t in traps if t.node not in names]
    if missing:
        raise HardenError(f"trap node(s) {', '.join(map(repr, missing))} are not in the graph")
    if not isinstance(x, (torch.Tensor, LazyImages)) or x.dim() < 1:
        raise HardenError("certify needs a batch of inputs [N, ...]")
    if not is_input_set(eps) and float(torch.as_tensor(eps).min()) < 0:
        raise HardenError(f"eps must be >= 0; got {eps}")
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise HardenError(f"labels must have shape [{x.shape[0]}]; got {tuple(y.shape)}")


def _chunks(n: int, size: int) -> Iterator[slice]:
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _eps_for(eps, rows: slice, x: torch.Tensor):
    """A per-sample eps tensor [N] is sliced with the batch and broadcast over the sample's dims."""
    if isinstance(eps, torch.Tensor) and eps.dim() > 0:
        part = eps[rows].to(x.device, x.dtype)
        return part.reshape((-1,) + (1,) * (x.dim() - 1))
    return float(eps)


class InputSet(Protocol):
    """A threat: per sample, the inputs an attacker may reach.  Certificates hold over :meth:`box` narrowed by
    :meth:`clamps`; :meth:`draw` gives members of the set for the sampling check."""

    def box(self, x: torch.Tensor, rows: slice) -> Interval:
        """A box containing each sample's set (``x`` is rows ``rows`` of the whole batch)."""

    def clamps(self, gm: fx.GraphModule, x: torch.Tensor, rows: slice) -> dict[str, Callable]:
        """Sound narrowings of node intervals that the box alone misses (may be empty)."""

    def draw(self, x: torch.Tensor, rows: slice, n_points: int, generator: torch.Generator) -> torch.Tensor:
        """[N, P, ...] members of each sample's set, the sample itself (or its nearest member) first."""


@dataclass
class LinfBall:
    """The L-inf ball of radius ``eps`` (a number or one per sample [N]) clipped to the input range."""

    eps: float | torch.Tensor
    input_range: Sequence[float] | None

    def box(self, x: torch.Tensor, rows: slice) -> Interval:
        return Interval.from_box(x, _eps_for(self.eps, rows, x), self.input_range)

    def clamps(self, gm: fx.GraphModule, x: torch.Tensor, rows: slice) -> dict[str, Callable]:
        return {}

    def draw(self, x: torch.Tensor, rows: slice, n_points: int, generator: torch.Generator) -> torch.Tensor:
        return draw_points(self.box(x, rows), n_points, generator, anchor=x)


def is_input_set(value) -> bool:
    return all(callable(getattr(value, name, None)) for name in ("box", "clamps", "draw"))


def as_input_set(eps, input_range) -> InputSet:
    """``eps`` itself when it is an :class:`InputSet`, else the L-inf ball of that radius."""
    return eps if is_input_set(eps) else LinfBall(eps, input_range)


def merge_clamps(*tables: dict[str, Callable] | None) -> dict[str, Callable]:
    """One clamp per node: several on the same node run in turn (each is sound, so their composition is)."""
    by_node: dict[str, list[Callable]] = {}
    for table in tables:
        for name, fn in (table or {}).items():
            by_node.setdefault(name, []).append(fn)

    def chain(fns):
        if len(fns) == 1:
            return fns[0]

        def run(iv):
            for fn in fns:
                iv = fn(iv)
            return iv

        return run

    return {name: chain(fns) for name, fns in by_node.items()}


def trap_clamps(traps: Sequence[Trap], device, dtype=torch.float32) -> tuple[dict[str, Callable], list[torch.Tensor]]:
    """Clamp functions intersecting each masked neuron's interval with (-inf, T].

    The second value is a list that each clamp appends a per-sample bool to: True
    where some masked lower bound already exceeds T (every input of the box alarms).
    """
    by_node: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for trap in traps:
        by_node.setdefault(trap.node, []).append(trap.on(device, dtype))
    always: list[torch.Tensor] = []

    def make(entries):
        def clamp(iv: Interval) -> Interval:
            if not isinstance(iv, Interval):
                raise HardenError("a CTT trap sits on a node that does not depend on the input")
            lo, hi = iv.lo.flatten(1), iv.hi.flatten(1)
            for idx, thresholds in entries:
                if idx.numel() and int(idx.max()) >= lo.shape[1]:
                    raise HardenError(f"trap index {int(idx.max())} out of range for an activation of "
                                      f"{lo.shape[1]} neurons")
                always.append((lo.index_select(1, idx) > thresholds).any(dim=1))
                capped = torch.minimum(hi.index_select(1, idx), thresholds)
                hi = hi.scatter(1, idx.unsqueeze(0).expand(hi.shape[0], -1), capped)
            return Interval(iv.lo, hi.reshape(iv.hi.shape))

        return clamp

    return {node: make(entries) for node, entries in by_node.items()}, always


def pre_activation_clamps(gm: fx.GraphModule, traps: Sequence[Trap], device,
                          dtype=torch.float32) -> dict[str, Callable]:
    """Clamps of the traps' *pre-activation* neurons to (-inf, z_max(T)]: an input that raises no alarm has
    activation <= T there, hence pre-activation <= z_max(T).  Linear relaxations of the activation are then
    taken over the clamped interval, which is what makes the detect-or-robust certificate tighter than
    clamping the activation alone."""
    by_node = {n.name: n for n in gm.graph.nodes}
    entries: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for trap in traps:
        node = by_node[trap.node]
        limit = PRE_ACTIVATION_LIMIT.get(canonical_op(gm, node))
        sources = [a for a in node.all_input_nodes]
        if limit is None or len(sources) != 1:
            continue
        idx, thresholds = trap.on(device, dtype)
        entries.setdefault(sources[0].name, []).append((idx, limit(thresholds)))

    def make(items):
        def clamp(iv: Interval) -> Interval:
            hi = iv.hi.flatten(1)
            for idx, cap in items:
                capped = torch.minimum(hi.index_select(1, idx), cap)
                hi = hi.scatter(1, idx.unsqueeze(0).expand(hi.shape[0], -1), capped)
            return Interval(iv.lo, hi.reshape(iv.hi.shape))

        return clamp

    return {name: make(items) for name, items in entries.items()}


def _alarm(values: dict[str, torch.Tensor], traps: Sequence[Trap], n: int, device) -> torch.Tensor:
    """The CTT check on real activations: any masked activation above its threshold."""
    alarm = torch.zeros(n, dtype=torch.bool, device=device)
    for trap in traps:
        idx, thresholds = trap.on(device, values[trap.node].dtype)
        alarm |= (values[trap.node].flatten(1).index_select(1, idx) > thresholds).any(dim=1)
    return alarm


def margin_lower_bound(gm: fx.GraphModule, result: BoundResult, y: torch.Tensor, fold: fx.Node | None) -> torch.Tensor:
    """Per sample, a lower bound of min_{j != y} (logit_y - logit_j) over the box.

    With a linear logits layer the margin is folded into it: the rows W_y - W_j
    meet the centre and radius of the layer's input, which is much tighter than
    subtracting two logit intervals (that loses every correlation between them).
    """
    if y.numel() and int(y.min()) < 0:
        raise HardenError(f"labels must be class indices >= 0; got {int(y.min())}")
    if fold is not None:
        args = fx.map_arg(fold.args, lambda n: result.nodes[n.name])
        kwargs = fx.map_arg(fold.kwargs, lambda n: result.nodes[n.name])
        module = gm.get_submodule(fold.target) if fold.op == "call_module" else None
        x, weight, bias = linear_parts(Call(gm, fold, "linear", tuple(args), dict(kwargs), module))
        _check_labels(y, weight.shape[0])
        if x.dim() == 2:
            return folded_margin_lower(x, weight, bias, y)
    logits = result.output
    if not isinstance(logits, Interval) or logits.dim() != 2:
        raise HardenError(f"certify needs logits [N, K]; the graph's output has shape "
                          f"{tuple(getattr(logits, 'shape', ()))}")
    _check_labels(y, logits.shape[1])
    return subtracted_margin_lower(logits, y)


def _check_labels(y: torch.Tensor, classes: int) -> None:
    if y.numel() and int(y.max()) >= classes:
        raise HardenError(f"label {int(y.max())} is out of range for a model with {classes} classes")


def _margin_record(fold: fx.Node | None) -> set[str]:
    return {n.name for n in fold.all_input_nodes} if fold is not None else set()


# ---------------------------------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------------------------------
class _PlacementTally:
    """Per trap, counts over samples x masked neurons of the four placement conditions (see :func:`placement`)."""

    def __init__(self, traps: Sequence[Trap]):
        self.traps = list(traps)
        self.counts = [[0, 0, 0, 0] for _ in self.traps]
        self.samples = 0

    def add(self, natural: dict[str, torch.Tensor], result: BoundResult, xb: torch.Tensor) -> None:
        self.samples += xb.shape[0]
        for trap, count in zip(self.traps, self.counts):
            idx, thresholds = trap.on(xb.device, xb.dtype)
            act = natural[trap.node].flatten(1).index_select(1, idx)
            iv = result.nodes[trap.node]
            count[0] += int((act <= thresholds).sum())
            count[1] += int((iv.hi.flatten(1).index_select(1, idx) >= thresholds).sum())
            lower = iv.lo.flatten(1).index_select(1, idx)
            count[2] += int((lower >= thresholds).sum())
            count[3] += int((lower > thresholds).sum())

    def merge(self, other: "_PlacementTally") -> None:
        self.samples += other.samples
        self.counts = [[a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(self.counts, other.counts)]

    def rows(self) -> list[dict]:
        out = []
        for trap, (below, upper, lower, exceeds) in zip(self.traps, self.counts):
            total = max(1, self.samples * trap.flat_indices.numel())
            out.append({"site": trap.node, "neurons": int(trap.flat_indices.numel()),
                        "natural_below": below / total, "upper_reaches": upper / total,
                        "lower_reaches": lower / total, "lower_exceeds": exceeds / total})
        return out


def placement(gm: fx.GraphModule, traps: Sequence[Trap], x: torch.Tensor, eps, input_range,
              batch_size: int = 256, bounds: str = "ibp") -> list[dict]:
    """Per trap, fractions over samples x masked neurons: natural activation <= T, hi >= T
    (sub-optimal placement: every detection is adversarial), lo >= T (optimal: every eps-perturbation is detected).

    ``lower_exceeds`` (lo > T) is the strict form: the alarm fires on ``activation > T``, so a
    neuron with lo == T (typically a dead ReLU with T = 0) meets the paper's condition without
    ever alarming.  :func:`certify_samples` with ``with_placement=True`` gives the same rows from its own
    bound pass (no second pass).
    """
    _check_inputs(gm, traps, x, eps)
    threat = as_input_set(eps, input_range)
    engine = _engine(gm, bounds)
    nodes = {t.node for t in traps}
    tally = _PlacementTally(traps)
    with torch.no_grad():
        for rows in _chunks(x.shape[0], batch_size):
            xb = x[rows]
            _, natural = run_recorded(gm, xb, nodes)
            box, extra = threat.box(xb, rows), threat.clamps(gm, xb, rows)
            result = (propagate(gm, box, record=nodes, clamp=extra) if engine is None
                      else engine.bound_graph(box, bounds, clamp=extra))
            tally.add(natural, result, xb)
    return tally.rows()


# ---------------------------------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------------------------------
@dataclass
class _BatchBounds:
    plain: BoundResult
    clamped: BoundResult
    robust: torch.Tensor
    detect_or_robust: torch.Tensor
    always_alarm: torch.Tensor
    margin: torch.Tensor
    margin_detect: torch.Tensor


def _bounds_and_margin(gm, box, yb, fold, record, engine: LinearBounds | None, method: str,
                       clamps=None, pre_clamps=None, reuse: BoundResult | None = None) -> tuple[BoundResult, torch.Tensor]:
    """Bounds of the recorded nodes and the margin lower bound, by ``method``.

    With a linear-relaxation method the margin is the larger of the backward-pass bound and the
    folded interval bound on the same intermediate bounds (both sound): never looser than intervals.
    """
    if engine is None:
        result = propagate(gm, box, record=record, clamp=clamps)
        return result, margin_lower_bound(gm, result, yb, fold)
    result = engine.bound_graph(box, method, clamp=clamps, pre_clamp=pre_clamps, reuse=reuse)
    margin = torch.maximum(margin_lower_bound(gm, result, yb, fold), engine.margin_lower(result.nodes, yb, fold))
    return result, margin


REFINE_CLAMPED = False
"""With ``--bounds crown``, whether the trap-clamped run refines its intermediate bounds by its own backward passes
(tighter detect-or-robust margins where the clamps narrow the refined nodes' inputs; twice the cost) or takes
the plain run's refined bounds, intersected with its clamped intervals."""


def _engine(gm: fx.GraphModule, bounds: str) -> LinearBounds | None:
    return None if check_method(bounds) == "ibp" else LinearBounds(gm)


def _bound_batch(gm, traps, xb, yb, threat: InputSet, rows: slice, fold, record: set[str],
                 engine: LinearBounds | None = None, method: str = "ibp",
                 lagrangian_steps: int | None = None, abstain: Sequence[AbstainAlarm] = ()) -> _BatchBounds:
    b = _trap_batch(gm, traps, xb, yb, threat, rows, fold, record | {a.node for a in abstain}, engine, method,
                    lagrangian_steps)
    for detector in abstain:
        # each detector's certificate on its own (sound under policy "any": its alarm is the combined alarm's)
        cert = certificate_of(detector.rows_lower(gm, fold, b.plain, yb, engine), yb)
        b.detect_or_robust = b.detect_or_robust | cert.detect_or_robust
        b.always_alarm = b.always_alarm | cert.always
        b.margin_detect = torch.maximum(b.margin_detect, torch.where(cert.always, torch.full_like(
            cert.margin_detect, float("inf")), cert.margin_detect))
    return b


def _trap_batch(gm, traps, xb, yb, threat: InputSet, rows: slice, fold, record: set[str],
                engine: LinearBounds | None = None, method: str = "ibp",
                lagrangian_steps: int | None = None) -> _BatchBounds:
    box, extra = threat.box(xb, rows), threat.clamps(gm, xb, rows)
    record = set(record) | _margin_record(fold)
    plain, margin = _bounds_and_margin(gm, box, yb, fold, record, engine, method, extra or None)
    robust = margin > 0
    if not traps:
        never = torch.zeros_like(robust)
        return _BatchBounds(plain, plain, robust, robust.clone(), never, margin, margin)
    clamps, always_parts = trap_clamps(traps, xb.device, xb.dtype)
    pre = pre_activation_clamps(gm, traps, xb.device, xb.dtype) if engine is not None else None
    # crown: the clamped run takes the plain run's refined bounds (every input that raises no alarm is an input of
    # the box) instead of refining again, which cost as much as the plain run (REFINE_CLAMPED: refine again)
    reuse = None if REFINE_CLAMPED or engine is None else plain
    clamped, margin_detect = _bounds_and_margin(gm, box, yb, fold, record, engine, method,
                                                merge_clamps(extra, clamps), pre, reuse)
    always = torch.stack(always_parts).any(dim=0)
    steps = lagrangian.STEPS if lagrangian_steps is None else int(lagrangian_steps)
    if engine is not None and steps > 0:
        margin_detect = torch.maximum(margin_detect, _lagrangian_margin(gm, traps, xb, yb, clamped, fold, engine,
                                                                        always | (margin_detect > 0), steps,
                                                                        plain=plain))
    detect_or_robust = always | (margin_detect > 0)
    return _BatchBounds(plain, clamped, robust, detect_or_robust, always, margin, margin_detect)


def _lagrangian_margin(gm, traps, xb, yb, clamped: BoundResult, fold, engine: LinearBounds, certified: torch.Tensor,
                       steps: int, stats: dict | None = None, plain: BoundResult | None = None) -> torch.Tensor:
    """Per sample, the Lagrangian lower bound of the margin over the box's quiet inputs
    (:mod:`harden.bounds.lagrangian`), on the capped pass's bounds; -inf where not computed: samples already
    certified, those whose natural input is quiet and misclassified (it lies in the box: no bound can certify
    them) and, given the ``plain`` run's bounds, those where no trap can fire anywhere in the box: there the
    quiet region is the whole box, the multipliers' terms are <= 0 on it, and on every bundle measured none left
    0 (docs/results/detect-or-robust.md); a backward pass per class row saved on deep models."""
    logits, natural = run_recorded(gm, xb, {t.node for t in traps})
    true = logits.gather(1, yb.unsqueeze(1)).squeeze(1)
    wrong = logits.scatter(1, yb.unsqueeze(1), float("-inf")).amax(dim=1) >= true
    hopeless = wrong & ~_alarm(natural, traps, xb.shape[0], xb.device)
    active = ~certified & ~hopeless
    if plain is not None:
        active &= traps_may_fire(plain, traps, xb.shape[0], xb.device)
    cons = lagrangian.constraints(gm, traps, xb.device, xb.dtype)
    return lagrangian.lagrangian_margin(engine, clamped.nodes, yb, fold, cons, steps=steps, active=active,
                                        stats=stats)


def traps_may_fire(bounds: BoundResult, traps: Sequence[Trap], n: int, device) -> torch.Tensor:
    """Per sample: some masked neuron's upper bound over the box is above its threshold."""
    fire = torch.zeros(n, dtype=torch.bool, device=device)
    for trap in traps:
        idx, thresholds = trap.on(device, bounds.nodes[trap.node].hi.dtype)
        fire |= (bounds.nodes[trap.node].hi.flatten(1).index_select(1, idx) > thresholds).any(dim=1)
    return fire


def certify_samples(gm: fx.GraphModule, traps: Sequence[Trap], x: torch.Tensor, y: torch.Tensor, eps,
                    input_range, batch_size: int = 256, bounds: str = "ibp", with_placement: bool = False,
                    lagrangian_steps: int | None = None, abstain: Sequence[AbstainAlarm] = ()) -> dict:
    """Per-sample certificates over the eps-box around each input (clipped to ``input_range``), or over the
    set an :class:`InputSet` passed as ``eps`` gives each input (``input_range`` is then unused).

    Returns bool tensors ``robust`` (label y everywhere in the box),
    ``detect_or_robust`` (every input of the box keeps label y or raises the CTT
    alarm) and ``always_alarm`` (every input of the box alarms), the margin lower
    bounds behind them (``margin``, ``margin_detect``), and ``fractions``.
    With ``traps=[]`` (the original model) detect_or_robust equals robust.
    ``bounds`` is one of ``ibp``, ``crown-ibp``, ``crown`` (see :mod:`harden.bounds.crown`).
    ``interval_only``: the ops the linear-relaxation passes bounded by their intervals (no relaxation).
    ``with_placement``: also ``placement``, the rows of :func:`placement`, read off the same unclamped bound
    pass (with crown that pass is the costly part, so it is not run twice).
    ``lagrangian_steps``: with ``crown`` / ``crown-ibp``, detect-or-robust also tries the Lagrangian bound
    (:mod:`harden.bounds.lagrangian`: a multiplier per trap neuron, so a trap constraint can cut the box) with
    this many Adam steps on the samples the caps leave uncertified; None: its default, 0: off.
    ``abstain``: abstain detectors (:class:`AbstainAlarm`); detect-or-robust then also holds where, for every
    wrong class j, the label or the abstain score (offset by its threshold) beats j over the whole box
    (:mod:`harden.bounds.abstain`), and always-alarm where the abstain score beats every class.
    """
    _check_inputs(gm, traps, x, eps, y)
    threat = as_input_set(eps, input_range)
    trap_nodes = {t.node for t in traps} if with_placement else set()
    engine = _engine(gm, bounds)
    fold = final_linear(gm)
    keys = ("robust", "detect_or_robust", "always_alarm", "margin", "margin_detect")
    y = y.to(device=x.device, dtype=torch.int64)

    def one_chunk(rows: slice):
        """Certificates of one batch; under torchrun each rank takes its own batches (harden.core.distributed)."""
        with torch.no_grad():
            xb = x[rows].to(y.device)   # data read on demand arrives on the CPU
            b = _bound_batch(gm, traps, xb, y[rows], threat, rows, fold, trap_nodes, engine, bounds,
                             lagrangian_steps, abstain)
            tally = None
            if with_placement:
                tally = _PlacementTally(traps)
                tally.add(run_recorded(gm, xb, trap_nodes)[1], b.plain, xb)
            return {key: getattr(b, key).cpu() for key in keys}, tally

    results = map_chunks(x.shape[0], batch_size, one_chunk)
    parts: dict[str, list[torch.Tensor]] = {k: [r[0][k] for r in results] for k in keys}
    tally = _PlacementTally(traps) if with_placement else None
    for _, part in results:
        if tally is not None:
            tally.merge(part)
    out = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for k, v in parts.items()}
    n = x.shape[0]
    out["fractions"] = {k: float(out[k].float().mean()) if n else 0.0
                        for k in ("robust", "detect_or_robust", "always_alarm")}
    out["samples"] = n
    out["margin_method"] = "folded into the last linear layer" if fold is not None else "interval subtraction"
    out["bounds"] = bounds
    out["interval_only"] = sorted(set().union(*gather(set(engine.interval_only)))) if engine is not None else []
    if tally is not None:
        out["placement"] = tally.rows()
    return out


# ---------------------------------------------------------------------------------------------------
# the check through the real model
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    sample: int          # index of the sample (box) in x
    point: int           # index of the drawn point within the box (0 = the sample itself, clipped)
    node: str            # graph node (the logits node for a certificate)
    kind: str            # "bound", "clamped-bound", "robust", "detect_or_robust"
    excess: float        # how far outside the bound / below zero margin

    def __str__(self) -> str:
        return f"sample {self.sample} point {self.point}: {self.kind} violated at node {self.node!r} by {self.excess:.3g}"


@dataclass
class CheckResult:
    boxes: int
    points: int
    nodes_checked: int
    violations: int = 0
    counts: dict[str, int] = field(default_factory=dict)     # violations per kind
    details: list[Violation] = field(default_factory=list)   # the first ``max_details`` violations of each kind

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def to_dict(self) -> dict:
        return {"boxes": self.boxes, "points": self.points, "nodes_checked": self.nodes_checked,
                "violations": self.violations, "by_kind": dict(self.counts),
                "examples": [str(v) for v in self.details[:20]]}


def draw_points(box: Interval, n_points: int, generator: torch.Generator,
                anchor: torch.Tensor | None = None) -> torch.Tensor:
    """[N, P, ...] points of each box: ``anchor`` (the sample, clipped to the box) if given, then about a
    quarter random vertices of the box, then uniform points."""
    n = box.shape[0]
    lo, hi = box.lo.unsqueeze(1), box.hi.unsqueeze(1)
    u = torch.rand((n, n_points) + tuple(box.shape[1:]), generator=generator).to(box.device, box.dtype)
    first = 1 if anchor is not None else 0
    n_corners = min(n_points - first, max(1, n_points // 4))
    if n_corners > 0:
        u[:, first:first + n_corners] = (u[:, first:first + n_corners] < 0.5).to(u.dtype)
    points = torch.maximum(torch.minimum(lo + u * (hi - lo), hi), lo)
    if anchor is not None:
        points[:, 0] = torch.maximum(torch.minimum(anchor, box.hi), box.lo)
    return points


def _tolerance(iv: Interval, rtol: float) -> torch.Tensor:
    """Per sample: rtol * max(1, largest |bound| of the node), broadcastable over the node's entries."""
    scale = torch.maximum(iv.lo.abs(), iv.hi.abs()).flatten(1)
    scale = torch.nan_to_num(scale, posinf=0.0).amax(dim=1).clamp_min(1.0)
    return (rtol * scale).reshape((-1,) + (1,) * (iv.dim() - 1))


def check_certificates(gm: fx.GraphModule, traps: Sequence[Trap], x: torch.Tensor, y: torch.Tensor, eps,
                       input_range, n_points: int, seed: int = 0, *, batch_points: int = 2048,
                       rtol: float = 1e-5, max_details: int = 100, bounds: str = "ibp",
                       lagrangian_steps: int | None = None, abstain: Sequence[AbstainAlarm] = ()) -> CheckResult:
    """Draw ``n_points`` per box (the sample, random vertices, uniform points; or, when ``eps`` is an
    :class:`InputSet`, the members its ``draw`` gives), run the real model on them (the CTT check done in
    torch) and count every contradiction:

    * a node value outside its interval (``bound``), or, for a point that does not
      alarm, outside its interval propagated with the traps clamped (``clamped-bound``);
    * a point of a *robust* box whose margin logit_y - max_{j != y} logit_j is below 0
      (``robust``);
    * a point of a *detect-or-robust* box that neither alarms nor keeps the label
      (``detect_or_robust``).

    Tolerance: rtol * max(1, the node's largest |bound| for that sample), for float rounding.
    """
    _check_inputs(gm, traps, x, eps, y)
    threat = as_input_set(eps, input_range)
    if n_points < 1:
        raise HardenError(f"--check needs at least one point per box; got {n_points}")
    method = bounds  # (``bounds`` names each node-bound table in the loop below)
    engine = _engine(gm, method)
    fold = final_linear(gm)
    dependent = input_dependent(gm)
    checked = [n.name for n in gm.graph.nodes if n in dependent and n.op != "output"]
    logits_name = output_node(gm).args[0].name
    y = y.to(device=x.device, dtype=torch.int64)

    def one_chunk(rows: slice) -> CheckResult:
        """The check on one batch of boxes; its points are drawn from the batch's own seed, so one process and
        any split across ranks draw the same points."""
        part = CheckResult(boxes=rows.stop - rows.start, points=0, nodes_checked=len(checked))

        def report(sample: int, point: int, node: str, kind: str, excess: float) -> None:
            part.violations += 1
            part.counts[kind] = part.counts.get(kind, 0) + 1
            if part.counts[kind] <= max_details:
                part.details.append(Violation(sample, point, node, kind, excess))

        generator = torch.Generator().manual_seed(chunk_seed(seed, rows, "check"))
        xb, yb = x[rows].to(y.device), y[rows]
        b = _bound_batch(gm, traps, xb, yb, threat, rows, fold, set(checked), engine, method, lagrangian_steps,
                         abstain)
        points = threat.draw(xb, rows, n_points, generator)
        nb = xb.shape[0]
        flat = points.reshape((nb * n_points,) + tuple(xb.shape[1:]))
        logits, values = run_recorded(gm, flat, checked)
        part.points += flat.shape[0]
        trap_alarm = _alarm(values, traps, flat.shape[0], flat.device).reshape(nb, n_points)
        alarm = trap_alarm.clone()
        for detector in abstain:
            alarm |= detector.alarm(values[detector.node], logits).reshape(nb, n_points)

        for name in checked:
            value = values.get(name)
            for kind, bounds, only in (("bound", b.plain, None), ("clamped-bound", b.clamped, ~trap_alarm)):
                if kind == "clamped-bound" and (not traps or bounds is b.plain):
                    continue
                iv = bounds.nodes.get(name)
                if not isinstance(iv, Interval) or not isinstance(value, torch.Tensor):
                    continue
                if value.shape[0] != flat.shape[0] or iv.shape[0] != nb or value.shape[1:] != iv.shape[1:]:
                    continue  # not a per-sample value (e.g. mixes the batch): nothing to compare
                v = value.reshape((nb, n_points) + tuple(value.shape[1:]))
                tol = _tolerance(iv, rtol).unsqueeze(1)
                excess = torch.maximum(iv.lo.unsqueeze(1) - tol - v, v - iv.hi.unsqueeze(1) - tol)
                excess = excess.flatten(2).amax(dim=2)                     # [nb, P]
                bad = excess > 0
                if only is not None:
                    bad &= only
                for s, p in bad.nonzero().tolist():
                    report(rows.start + s, p, name, kind, float(excess[s, p]))

        logits = logits.reshape(nb, n_points, -1)
        k = logits.shape[-1]
        true = logits.gather(2, yb.view(nb, 1, 1).expand(nb, n_points, 1)).squeeze(2)
        others = logits.masked_fill(torch.nn.functional.one_hot(yb, k).bool().unsqueeze(1), float("-inf"))
        margin = true - others.amax(dim=2)                                  # [nb, P]
        tol = rtol * logits.abs().flatten(1).amax(dim=1).clamp_min(1.0).unsqueeze(1)
        flipped = margin < -tol
        for kind, cert, bad in (("robust", b.robust, flipped),
                                ("detect_or_robust", b.detect_or_robust, flipped & ~alarm)):
            for s, p in (bad & cert.unsqueeze(1)).nonzero().tolist():
                report(rows.start + s, p, logits_name, kind, float(-margin[s, p]))
        return part

    result = CheckResult(boxes=x.shape[0], points=0, nodes_checked=len(checked))
    with torch.no_grad():
        parts = map_chunks(x.shape[0], max(1, batch_points // n_points), one_chunk)
    for part in parts:   # in sample order: the first max_details of each kind are the single pass's
        result.points += part.points
        result.violations += part.violations
        for kind, count in part.counts.items():
            kept = sum(1 for d in result.details if d.kind == kind)
            result.details += [d for d in part.details if d.kind == kind][: max(0, max_details - kept)]
            result.counts[kind] = result.counts.get(kind, 0) + count
    return result


# ---------------------------------------------------------------------------------------------------
# a bundle's report
# ---------------------------------------------------------------------------------------------------
BOUND_LABELS = {
    "ibp": "interval (IBP)",
    "crown-ibp": "crown-ibp (intermediate bounds by intervals, margin by a backward linear relaxation)",
    "crown": "crown (intermediate and margin bounds by backward linear relaxation)",
    "sdp": "sdp (two-layer networks: the semidefinite certificate of the thesis, Eq. 10-13; CTT traps and abstain "
           "detectors not modelled, detect-or-robust reported equal to robust)",
}
BOUND_METHODS = tuple(BOUND_LABELS)


def check_bound_method(method: str) -> str:
    """``--bounds``: one of :data:`BOUND_METHODS` (sdp only for two-layer networks, checked when it runs)."""
    if method not in BOUND_METHODS:
        raise HardenError(f"--bounds {method!r} is not one of {', '.join(BOUND_METHODS)}")
    return method
