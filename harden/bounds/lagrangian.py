"""A Lagrangian bound of the label margin over the box's *quiet* inputs (no CTT trap fires): the detect-or-robust
certificate in which a trap constraint can cut the box.

For each trap neuron k the no-alarm region is ``u_k(x) <= T_k``.  For any lambda >= 0 (one per trap neuron),

    min over {x in B : u_k(x) <= T_k for all k} of margin_j(x)
        >= min over {x in B : ...} of [margin_j(x) + sum_k lambda_k (u_k(x) - T_k)]     (each added term is <= 0)
        >= L_j(lambda),

where L_j(lambda) is the backward linear-relaxation (CROWN) lower bound of the *combined* row
``margin_j + sum_k lambda_k u_k - sum_k lambda_k T_k``, with the intermediate bounds of the quiet region (the trap
caps already applied, as :mod:`harden.certification.certify` computes them).  Capping a trap's own interval can
only remove its own contribution; here the trap's linear dependence on the input enters the same backward pass
as the margin's and can cancel it (an attack direction that raises a trap costs the attacker lambda_k per unit).

``u_k`` is the trap neuron's pre-activation z when the trap sits on a ReLU (relu(z) <= T <=> z <= T for T >= 0;
``harden.bounds.margin.PRE_ACTIVATION_LIMIT``, so a ReLU6 trap with T >= 6 gives no constraint), else the
trap node's value itself.  The row's ReLU relaxation at the trap is then not involved in the lambda term.

lambda = 0 is CROWN's margin bound on the capped intermediate bounds (what certify computes today); lambda is
optimised per sample, per wrong class j and per trap neuron by projected Adam ascent on L_j (like alpha-CROWN's
slopes), and the best bound seen at any step is kept (every step's bound is sound), so the result is never below
the lambda = 0 bound.  Only rows that are not certified yet are optimised, and each row leaves once it is, or
after the first step when its gradient at lambda = 0 is <= 0 in every coordinate (every trap quiet at the
relaxation's worst case: Adam would project it back to 0 at every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from harden.bounds.backward import Back
from harden.bounds.crown import LinearBounds, _box_lower_of
from harden.bounds.linear import linear_parts
from harden.bounds.margin import PRE_ACTIVATION_LIMIT
from harden.errors import HardenError
from harden.graph.ops import canonical_op

STEPS = 20
"""Adam steps per batch (0 turns the Lagrangian off)."""
LR = 0.5
"""Adam step size on lambda (lambda's unit: margin per unit of the trap neuron)."""
ROWS_PER_PASS = 1024
"""Rows (sample x wrong class) per backward pass; each keeps its autograd graph for one step."""
REACH = 4.0
"""A row is given up (its best bound kept) once, from step DROP_AFTER on, REACH x its largest per-step gain so far
x the steps left cannot lift its best bound to 0: a row at -2e9 on a deep net that gains 1e7 per step costs a
backward pass per step for nothing.  Tightness only: every bound kept is sound."""
DROP_AFTER = 3
"""The first step at which a row can be given up (after three gains are seen)."""


@dataclass
class Constraint:
    """Trap neurons on one node: ``node``'s flat positions ``index`` must stay <= ``limit`` (no alarm)."""

    node: fx.Node
    index: torch.Tensor
    limit: torch.Tensor


def constraints(gm: fx.GraphModule, traps: Sequence, device, dtype=torch.float32) -> list[Constraint]:
    """The no-alarm constraints of ``traps`` (:class:`harden.certification.certify.Trap`), each on the trap's
    pre-activation where the trap sits on a (single-input) ReLU / ReLU6, else on the trap node itself.  A neuron
    whose limit is +inf (ReLU6 with T >= 6) constrains nothing and is left out."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out = []
    for trap in traps:
        node = by_name[trap.node]
        idx, thresholds = trap.on(device, dtype)
        limit_of = PRE_ACTIVATION_LIMIT.get(canonical_op(gm, node))
        sources = node.all_input_nodes
        if limit_of is not None and len(sources) == 1:
            node, limit = sources[0], limit_of(thresholds)
        else:
            limit = thresholds
        keep = torch.isfinite(limit)
        if bool(keep.any()):
            out.append(Constraint(node, idx[keep], limit[keep]))
    return out


def _first_back(engine: LinearBounds, values: dict, ys: torch.Tensor, others: torch.Tensor, rows: torch.Tensor,
                fold: fx.Node | None):
    """The rows logit_y - logit_j (one per ``rows`` entry, class ``others``) as a Back on the graph, and the
    node the pass starts from (as :meth:`LinearBounds._margin_chunk`)."""
    out = next(n for n in reversed(engine.nodes) if n.op == "output")
    logits = out.args[0]
    if fold is not None:
        call = engine._call(fold, values)
        x, weight, bias = linear_parts(call)
        if x.dim() == 2:
            first = Back(call, None, rows)
            first.emit(x, weight[ys] - weight[others])
            if bias is not None:
                first.add_bias(bias[ys] - bias[others])
            return first, fold
    iv = values[logits.name]
    eye = torch.eye(iv.shape[1], dtype=iv.dtype, device=iv.device)
    A = eye[ys] - eye[others]
    first = engine._backward(logits, values, A, rows)
    if first is None:
        raise HardenError("bounds: the Lagrangian bound needs a backward rule at the logits node")
    return first, logits


def _lower(engine: LinearBounds, values: dict, start: fx.Node, first: Back,
           seeds: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """Lower bounds [R] of the rows ``first`` holds plus the ``seeds`` (coefficients [R, *node shape] on other
    nodes before ``start``), in one backward pass to the box (:meth:`LinearBounds._run` without its windowed
    shortcut, which needs every coefficient to sit on one flattening node)."""
    rows = first.rows
    total = torch.zeros(rows.shape[0], dtype=values[start.name].lo.dtype, device=rows.device) + first.bias
    pending: dict[fx.Node, torch.Tensor] = {}
    engine._collect(start, first, values, pending)
    for node, coefficients in seeds.items():
        pending[node] = pending[node] + coefficients if node in pending else coefficients
    for n in reversed(engine.nodes[:engine.position[start]]):
        A = pending.pop(n, None)
        if A is None:
            continue
        if n.op == "placeholder":
            total = total + _box_lower_of(A, values[n.name], rows)
            continue
        back = engine._backward(n, values, A, rows)
        if back is None:
            total = total + _box_lower_of(A, values[n.name], rows)
            continue
        total = total + back.bias
        engine._collect(n, back, values, pending)
    if pending:
        raise HardenError(f"bounds: coefficients left on {', '.join(n.name for n in pending)} after the pass")
    return total


def _seeds(cons: list[Constraint], values: dict, lam: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """lambda [R, total constraints] as coefficients on the constraint nodes, and the constant -sum lambda T."""
    seeds: dict[fx.Node, torch.Tensor] = {}
    offset, bias = 0, 0.0
    for c in cons:
        m = c.index.numel()
        part = lam[:, offset:offset + m]
        offset += m
        shape = tuple(values[c.node.name].shape[1:])
        dense = torch.zeros((lam.shape[0], int(torch.Size(shape).numel())), dtype=lam.dtype, device=lam.device)
        dense = dense.index_add(1, c.index, part).reshape((lam.shape[0],) + shape)
        seeds[c.node] = seeds[c.node] + dense if c.node in seeds else dense
        bias = bias - part.matmul(c.limit)
    return seeds, bias


def lagrangian_margin(engine: LinearBounds, values: dict, y: torch.Tensor, fold: fx.Node | None,
                      cons: list[Constraint], start: torch.Tensor | None = None, *, steps: int = STEPS,
                      lr: float = LR, active: torch.Tensor | None = None, stats: dict | None = None) -> torch.Tensor:
    """Per sample, a lower bound of min_{j != y} margin_j over the box's quiet inputs: the best Lagrangian bound
    over ``steps`` projected Adam steps from lambda = 0, per (sample, class j) row.

    ``values``: the node bounds of the quiet region (certify's capped pass over the same box).  ``start``
    ([N, K - 1] or None): a sound lower bound per row already known (e.g. the lambda = 0 one); a row starts from
    it and is optimised only while it is <= 0.  ``active`` (bool [N]): the samples worth optimising (the others
    get -inf, or their ``start`` bound).  ``stats`` (a dict) gets ``rows`` (rows optimised) and ``moved`` (those
    whose multipliers left 0 at the first step: some trap above its limit at the relaxation's worst case).
    """
    out = next(n for n in reversed(engine.nodes) if n.op == "output")
    logits = values[out.args[0].name]
    n, k = y.shape[0], logits.shape[1]
    device = y.device
    classes = torch.arange(k, device=device)
    others = classes.expand(n, k)[classes.unsqueeze(0) != y.unsqueeze(1)].reshape(n, k - 1)
    best = (start.clone() if start is not None
            else torch.full((n, k - 1), float("-inf"), dtype=logits.dtype, device=device))
    width = sum(c.index.numel() for c in cons)
    if not cons or width == 0 or steps <= 0 or k < 2:
        return best.amin(dim=1) if k >= 2 else torch.full((n,), float("inf"), device=device)
    sample = torch.arange(n, device=device).unsqueeze(1).expand(n, k - 1)
    want = best <= 0
    if active is not None:
        want &= active.to(device).unsqueeze(1)
    # A sample with some row hopeless (natural input quiet and misclassified) cannot be certified: the callers
    # pass it in ``active``; here only rows still <= 0 are optimised.
    flat_rows = want.reshape(-1).nonzero().squeeze(1)
    if stats is not None:
        stats.update(rows=int(flat_rows.numel()), moved=0)
    if flat_rows.numel() == 0:
        return best.amin(dim=1)
    s_of, j_of = sample.reshape(-1)[flat_rows], others.reshape(-1)[flat_rows]
    y_of = y[s_of]
    lam = torch.zeros((flat_rows.numel(), width), dtype=logits.dtype, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([lam], lr=lr)
    flat_best = best.reshape(-1)
    stuck = torch.zeros(flat_rows.numel(), dtype=torch.bool, device=device)
    gain = torch.zeros(flat_rows.numel(), dtype=logits.dtype, device=device)
    dropped = torch.zeros_like(stuck)
    previous = None
    with torch.enable_grad():
        for step in range(steps + 1):
            live = ((flat_best[flat_rows] <= 0) & ~stuck).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            optimiser.zero_grad(set_to_none=True)
            for part in live.split(ROWS_PER_PASS):
                # Relaxation parameters memoised during one pass can hold that pass's autograd graph (shared across
                # passes, a RegNet block failed with "backward through the graph a second time"): each builds its own.
                engine.memo = {}
                lam_part = lam.index_select(0, part)
                first, node = _first_back(engine, values, y_of[part], j_of[part], s_of[part], fold)
                seeds, bias = _seeds(cons, values, lam_part)
                bound = _lower(engine, values, node, first, seeds) + bias
                with torch.no_grad():
                    where = flat_rows[part]
                    flat_best[where] = torch.maximum(flat_best[where], bound.detach())
                if step < steps:
                    (-bound.sum()).backward()
            with torch.no_grad():
                now = flat_best[flat_rows]
                if previous is not None:
                    gain = torch.maximum(gain, now - previous)
                    if step >= DROP_AFTER:
                        dropped |= ~stuck & (now <= 0) & (now + REACH * gain * (steps - step) <= 0)
                        stuck |= dropped
                previous = now.clone()
            if step < steps:
                optimiser.step()
                with torch.no_grad():
                    lam.clamp_(min=0)
                    if step == 0:
                        # A row whose first step leaves every multiplier at 0 has a gradient <= 0 at lambda = 0 in
                        # every coordinate: each later step sees the same gradient there and projects back to 0,
                        # so the row is done (its bound is the lambda = 0 one).
                        stuck = (lam == 0).all(dim=1)
                        if stats is not None:
                            stats["moved"] = int((~stuck).sum())
    if stats is not None:
        stats["dropped"] = int(dropped.sum())
    return flat_best.reshape(n, k - 1).amin(dim=1)


__all__ = ["Constraint", "constraints", "lagrangian_margin", "STEPS", "LR"]
