"""The semidefinite certificate of two-layer networks (thesis 001, Eq. 10-13, after Raghunathan et al. 2018).

For logits ``W2 relu(W1 x + b1) + b2``, label y and another class j, let ``v = W2_j - W2_y``, so that
``g(x) = v . relu(W1 x + b1)`` is the part of logit_j - logit_y the input moves.  Every input set harden
certifies lies in a box ``[c - rho, c + rho]`` (the flow threat's box is exact, :mod:`harden.bounds.flow_box`).
Along the segment from c to a point x of the box, relu' lies in [0, 1], so by the mean value theorem

    g(x) - g(c) = v^T diag(s) W1 diag(rho) e   for some s in [0, 1]^m and e in [-1, 1]^d       (Eq. 10)

With s = (1 + z_s) / 2 and B = diag(v) W1 diag(rho), the right side is z^T P z for z = (1, z_s, e) and

    P = 1/4 [[0, Bt], [Bt^T, 0]],   Bt = [1^T B; B]                                             (Eq. 11)

(the thesis splits the pixel change into flow-u and flow-v blocks of a first-order expansion, which does
not bound the bilinear interpolation; the exact per-pixel range rho does, in the same shape).  Its maximum
over ||z||_inf <= 1 is bounded by the SDP  max <P, Z>  s.t.  diag(Z) <= 1, Z psd  (Eq. 12-13), whose dual
is  min sum(c)  s.t.  diag(c) - P psd.  Any c with diag(c) - P psd bounds z^T P z <= sum(c) for every such
z; the solver's c is made exactly feasible (its diagonal raised by the most negative eigenvalue of
diag(c) - P, computed in float64) before it is used, so solver inaccuracy never makes the bound unsound.

The margin logit_y - logit_j is then at least  -(g(c) + sum(c)) + b2_y - b2_j, and the sample is robust
when this is positive for every j.  Pixels with rho = 0 drop out of the SDP (their columns of B are zero).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from harden.bounds.flow_tv import first_affine_layers
from harden.errors import HardenError
from harden.graph.ops import canonical_op
from harden.graph.trace import output_node

SOLVERS = ("CLARABEL", "SCS")


@dataclass
class TwoLayer:
    w1: torch.Tensor     # [m, d]
    b1: torch.Tensor     # [m]
    w2: torch.Tensor     # [k, m]
    b2: torch.Tensor     # [k]


def two_layer_parts(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> TwoLayer:
    """The weights of ``(flatten ->) linear -> relu -> linear``, or one line saying why the graph is not that."""
    firsts = [f for f in first_affine_layers(gm, tuple(input_shape)) if f.kind == "linear"]
    out = output_node(gm).args[0]
    why = ("the SDP certificate needs a two-layer network: (flatten ->) linear -> relu -> linear; "
           f"this graph's output is {getattr(out, 'name', out)!r}")
    if len(firsts) != 1 or not isinstance(out, fx.Node) or canonical_op(gm, out) != "linear":
        raise HardenError(why)
    relu = out.args[0] if out.args else None
    if not isinstance(relu, fx.Node) or canonical_op(gm, relu) != "relu" or len(relu.all_input_nodes) != 1 \
            or relu.all_input_nodes[0].name != firsts[0].node:
        raise HardenError(why)
    second = _linear_weights(gm, out)
    if second is None:
        raise HardenError(why)
    w1, b1 = firsts[0].weight, firsts[0].bias
    w2, b2 = second
    m = w1.shape[0]
    b1 = b1 if b1 is not None else torch.zeros(m)
    b2 = b2 if b2 is not None else torch.zeros(w2.shape[0])
    return TwoLayer(w1.double(), b1.detach().double(), w2.detach().double(), b2.detach().double())


def _linear_weights(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module.weight.detach(), (module.bias.detach() if module.bias is not None else None)
    args = list(node.args[1:]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]
    values = []
    for a in args[:2]:
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                return None
            target = gm
            for part in a.target.split("."):
                target = getattr(target, part)
            a = target
        values.append(a)
    if not values or values[0] is None:
        return None
    return values[0].detach(), (values[1].detach() if isinstance(values[1], torch.Tensor) else None)


def sdp_bound(b: np.ndarray, fixed: np.ndarray | None = None, *, solver: str = "SCS",
              accuracy: float = 1e-3) -> tuple[float, dict]:
    """A sound upper bound of max over s in [0,1]^m, e in [-1,1]^d of s^T b e + fixed . e (b: [m, d],
    ``fixed``: [d], the rows of units whose s is 1), via the dual SDP (Eq. 12-13), its solution repaired to
    exact feasibility.  ``accuracy`` is the solver's tolerance: a looser one is faster and the repair keeps
    the bound sound, only a little larger."""
    import cvxpy as cp

    if solver not in SOLVERS:
        raise HardenError(f"SDP solver {solver!r} is not one of {', '.join(SOLVERS)}")
    m, d = b.shape
    fixed = np.zeros(d) if fixed is None else np.asarray(fixed, dtype=np.float64)
    if d == 0 or (not np.any(b) and not np.any(fixed)):
        return 0.0, {"status": "trivial", "size": 0, "shift": 0.0}
    if m == 0:   # no free unit: the maximum is exact, |fixed|_1
        return float(np.abs(fixed).sum()), {"status": "exact", "size": 0, "shift": 0.0}
    bt = np.vstack([b.sum(axis=0, keepdims=True) + 2 * fixed[None], b])     # [m + 1, d]
    n = m + 1 + d
    p = np.zeros((n, n))
    p[: m + 1, m + 1:] = bt / 4
    p[m + 1:, : m + 1] = bt.T / 4
    c = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum(c)), [cp.diag(c) - p >> 0])
    options = {"eps": accuracy} if solver == "SCS" else {"tol_gap_abs": accuracy, "tol_gap_rel": accuracy}
    try:
        problem.solve(solver=solver, **options)
    except cp.error.SolverError as exc:
        raise HardenError(f"SDP solver {solver} failed: {exc}") from None
    if c.value is None:
        raise HardenError(f"SDP solver {solver} returned no solution ({problem.status})")
    value = np.asarray(c.value, dtype=np.float64)
    # Exactly feasible: raise the diagonal by the most negative eigenvalue (with a margin for eigvalsh's error).
    lowest = float(np.linalg.eigvalsh(np.diag(value) - p)[0])
    shift = max(0.0, -lowest) + 1e-9 * max(1.0, float(np.abs(p).max()) * n)
    return float(value.sum() + n * shift), {"status": problem.status, "size": n, "shift": shift}


MOVING = 1e-4
"""Pixels whose radius is below this fraction of the largest are left out of the SDP; their whole possible
contribution (|v| |W1| rho, exact) is added to the bound instead, which keeps it sound and the SDP small."""


def sdp_margins(net: TwoLayer, centre: torch.Tensor, radius: torch.Tensor, y: torch.Tensor, *,
                solver: str = "SCS", accuracy: float = 1e-3, stop_at_failure: bool = False) -> tuple[torch.Tensor, dict]:
    """Per sample [N], a lower bound of min over the box and over j != y of logit_y - logit_j, with facts.

    Hidden units that the box's interval bounds prove inactive (pre-activation <= 0 throughout) have s = 0
    and drop out; units proved active have s = 1 (relu' is constant along every segment then), which Eq. 10
    allows and which keeps the SDP to the units that may switch.  With ``stop_at_failure`` the remaining
    classes of a sample are skipped once one class refutes it (its margin is then that class's bound).
    """
    n = centre.shape[0]
    flat_c = centre.reshape(n, -1).double()
    flat_r = radius.reshape(n, -1).double()
    k = net.w2.shape[0]
    out = torch.full((n,), float("inf"), dtype=torch.float64)
    started, solved, largest = time.perf_counter(), 0, 0
    for i in range(n):
        pre = net.w1 @ flat_c[i] + net.b1
        spread = net.w1.abs() @ flat_r[i]
        active, inactive = pre - spread >= 0, pre + spread <= 0
        free = ~(active | inactive)
        hidden = torch.relu(pre)
        moving = flat_r[i] > MOVING * float(flat_r[i].max().clamp_min(1e-30))
        w1_rho = net.w1[:, moving] * flat_r[i, moving]                       # [m, d_moving]
        rest = (net.w1[:, ~moving].abs() @ flat_r[i, ~moving])              # [m]: each unit's unmodelled reach
        for j in range(k):
            if j == int(y[i]):
                continue
            v = net.w2[j] - net.w2[int(y[i])]
            bias = float(net.b2[int(y[i])] - net.b2[j])
            b = (v[free, None] * w1_rho[free]).numpy()
            fixed = (v[active, None] * w1_rho[active]).sum(0).numpy()
            bound, facts = sdp_bound(b, fixed, solver=solver, accuracy=accuracy)
            bound += float((v.abs() * rest)[~inactive].sum())
            solved += 1
            largest = max(largest, facts["size"])
            margin = bias - float(v @ hidden) - bound
            out[i] = min(out[i], margin)
            if stop_at_failure and margin <= 0:
                break
    return out, {"problems": solved, "largest": largest, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------- certify
LABEL = ("sdp (two-layer networks: the thesis's semidefinite certificate, Eq. 10-13, on the input set's box; "
         "the CTT traps are not modelled, so detect-or-robust is reported equal to robust)")


def certify_sdp(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, eps, input_range, *, solver: str = "SCS",
                accuracy: float = 1e-3) -> dict:
    """:func:`~harden.certification.certify.certify_samples`'s report, by the SDP (robust only)."""
    from harden.certification.certify import as_input_set

    net = two_layer_parts(gm, tuple(x.shape[1:]))
    threat = as_input_set(eps, input_range)
    box = threat.box(x, slice(0, x.shape[0]))
    margin, facts = sdp_margins(net, box.centre, box.radius, y, solver=solver, accuracy=accuracy)
    robust = margin > 0
    n = x.shape[0]
    fraction = float(robust.float().mean()) if n else 0.0
    return {"robust": robust, "detect_or_robust": robust.clone(), "always_alarm": torch.zeros_like(robust),
            "margin": margin, "margin_detect": margin, "samples": n, "bounds": "sdp", "interval_only": [],
            "fractions": {"robust": fraction, "detect_or_robust": fraction, "always_alarm": 0.0},
            "margin_method": "SDP per class pair", "sdp": facts}


def check_sdp(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, eps, input_range, robust: torch.Tensor,
              n_points: int, seed: int = 0, rtol: float = 1e-5) -> dict:
    """Members of each certified sample's set (the threat's ``draw``) through the real model: any whose label
    changes contradicts the certificate."""
    from harden.certification.certify import as_input_set

    if n_points < 1:
        raise HardenError(f"--check needs at least one point per sample; got {n_points}")
    threat = as_input_set(eps, input_range)
    generator = torch.Generator().manual_seed(int(seed))
    points = violations = 0
    examples = []
    with torch.no_grad():
        for start in range(0, x.shape[0], max(1, 2048 // n_points)):
            rows = slice(start, min(x.shape[0], start + max(1, 2048 // n_points)))
            xb, yb = x[rows], y[rows]
            drawn = threat.draw(xb, rows, n_points, generator)
            logits = gm(drawn.reshape((-1,) + tuple(xb.shape[1:]))).reshape(xb.shape[0], n_points, -1)
            true = logits.gather(2, yb.view(-1, 1, 1).expand(-1, n_points, 1)).squeeze(2)
            others = logits.masked_fill(torch.nn.functional.one_hot(yb, logits.shape[-1]).bool().unsqueeze(1),
                                        float("-inf")).amax(2)
            tol = rtol * logits.abs().flatten(1).amax(1).clamp_min(1.0).unsqueeze(1)
            bad = (true - others < -tol) & robust[rows].unsqueeze(1)
            points += drawn.shape[0] * n_points
            for s, p in bad.nonzero().tolist():
                violations += 1
                if len(examples) < 20:
                    examples.append(f"sample {rows.start + s} point {p}: robust (sdp) violated by "
                                    f"{float(others[s, p] - true[s, p]):.3g}")
    return {"points": points, "violations": violations, "examples": examples}
