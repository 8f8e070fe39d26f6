"""Backward linear-relaxation bounds (CROWN, Zhang et al. 2018) over an fx graph, batched over samples.

Three bound methods, one name each (``--bounds``):

* ``ibp``: interval bound propagation (:func:`harden.bounds.propagate`);
* ``crown-ibp``: intermediate bounds from intervals, the margin by one backward pass;
* ``crown``: intermediate bounds refined by backward passes too.  A node is refined only where a
  later relaxation reads it (a ReLU's unstable input neurons), two rows per neuron (its lower and
  its upper bound), and the refined interval replaces the interval one in the forward pass, so
  everything after it is bounded from it.  Refined bounds are intersected with the interval ones,
  so they are never looser.  The passes of a node d mixing layers deep run in stages that stop at
  depth d - 2, d - 4, d - 8, ..., then 1 (see :meth:`LinearBounds._stages`), each on the neurons the
  last left unstable; a stage that settles fewer than :data:`MIN_SETTLED` of them ends the node's
  refinement unless the next one is cheap (:data:`STAGE_WORK`).  So ``crown`` is full
  back-substitution on small nets and where stages keep settling neurons; on a deep net whose
  bounds blow up (no stage settles anything) it is CROWN to two mixing layers below each node,
  on top of nodes refined the same way.

A *row* is one linear function of one sample; all rows of all samples go through one backward
pass (chunked to a memory budget), whatever their sample.  Everything stays on the device of the
input box.  Rules live in :data:`BACKWARD_RULES`, one small file per op family.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

# Importing the rule families registers them.
from harden.bounds import backward_activations, backward_affine, backward_pooling, backward_smooth  # noqa: F401
from harden.bounds import entries
from harden.bounds.backward import BACKWARD_RULES, Back, flat_sum, segments
from harden.bounds.backward_pooling import _geometry as _pool_geometry, entries_read
from harden.bounds.interval import Interval
from harden.bounds.linear import linear_parts
from harden.bounds.propagate import BoundResult, IntervalInterpreter, check_supported, input_dependent
from harden.bounds.rules import Call
from harden.bounds.windowed import chain_below, conv_neuron_lower, map_lower
from harden.errors import HardenError
from harden.graph.ops import canonical_op, op_spelling

METHODS = ("ibp", "crown-ibp", "crown")
STAGE = "linear-relaxation bounds"

ACTIVATIONS = frozenset({"relu", "relu6", "hardtanh", "leaky_relu"})
"""Element-wise ops whose output bounds follow from their input bounds: refine the input instead."""

_EXACT_ON_A_BOX = frozenset({"identity", "flatten", "reshape", "permute", "transpose", "batch_norm", "getitem",
                             "slice", "select", "neg"})
_MIXING = frozenset({"linear", "conv1d", "conv2d"})
_FLATTENS = frozenset({"flatten", "reshape"})
"""Keep the batch dim and only re-read each sample's block in a new shape: coefficients pass by a reshape."""
_SHAPE_QUERIES = frozenset({"size", "getattr"})
"""Input-dependent nodes whose value is a concrete shape, never bounds: no backward rule needed."""

MIN_SETTLED = 0.01
"""A stage that settles fewer than this fraction of the neurons it refines ends the refinement of the node.

Deeper stages cost more (a pass to depth m runs through d - m layers) and settle what the shallower one nearly
settled; where bounds blow up (a normally trained ResNet-18 at eps 1/255: every neuron of every refined node
unstable, none settled by any stage) they only narrow intervals that stay unstable, at most of the cost."""

STAGE_WORK = 1 << 22
"""A deeper stage after one that settled fewer than :data:`MIN_SETTLED` of its neurons still runs when its passes
run through at most this many coefficients per sample (rows per sample times :meth:`LinearBounds.passed_per_row`).

Settling is a poor forecast on small nets: on vgg-digits at eps 0.02 the first stage of the first dense layer
(stopping two layers below) settles none of its 640 neurons and the next (one layer above the input) 17%;
stopping there cost 6 of -10 in mean margin (20 images) for 30% less time.  That stage runs through 2.5M
coefficients per sample (all 128 neurons unstable), LeNet-5's deeper stage 0.7M; a ResNet-18's deeper stages
8M (the last block) to 440M (the first)."""

ROW_BUDGET = 1 << 24
"""Coefficients alive at once in one chunk of rows of a backward pass (~64 MB in float32): see :meth:`LinearBounds.live_per_row`."""

TEMPORARIES = 3
"""Tensors of a node's size a backward rule holds besides its input coefficients (a ReLU step: the slopes picked
by sign, the product, the negative part for the intercepts)."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise HardenError(f"--bounds {method!r} is not one of {', '.join(METHODS)}")
    return method


def box_lower(A: torch.Tensor, box: Interval, rows: torch.Tensor) -> torch.Tensor:
    """min over the box of sum(A * x), per row: A+ lo + A- hi."""
    runs = segments(rows)
    if runs is not None:   # per sample, two products with its bounds (no copy of them per row)
        flat = A.reshape(A.shape[0], -1)
        lo, hi = box.lo.reshape(box.shape[0], -1), box.hi.reshape(box.shape[0], -1)
        return torch.cat([flat[i:j].clamp(min=0).matmul(lo[s]) + flat[i:j].clamp(max=0).matmul(hi[s])
                          for s, i, j in runs])
    lo, hi = box.lo.index_select(0, rows), box.hi.index_select(0, rows)
    return flat_sum(A.clamp(min=0) * lo + A.clamp(max=0) * hi)


def _has_intervals(value) -> bool:
    """An Interval, or a tuple of values with one (chunk, split, unbind, attention's (output, weights))."""
    return isinstance(value, Interval) or (isinstance(value, (tuple, list))
                                           and any(isinstance(v, Interval) for v in value))


def _box_lower_of(A, value, rows: torch.Tensor) -> torch.Tensor:
    """:func:`box_lower` of a node's value: an Interval, or (``A`` a dict by item) a tuple of them."""
    if isinstance(A, dict):
        return sum(box_lower(a, value[i], rows) for i, a in A.items())
    return box_lower(A, value, rows)


class LinearBounds:
    """The backward passes of one graph; :meth:`bound_graph` runs the forward pass, :meth:`margin_lower` the spec."""

    def __init__(self, gm: fx.GraphModule, row_budget: int = ROW_BUDGET):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.keys = {n: canonical_op(gm, n) for n in self.nodes}
        self.dependent = input_dependent(gm)
        self.row_budget = row_budget
        self.rules_used: set[str] = set()
        self.depth = self._mixing_depth()
        self.memo: dict = {}
        self.windowed = True
        self.windowed_rows = 0
        """Single conv neurons above a convolutional chain go through :mod:`harden.bounds.windowed`."""
        self.chain_rows = 0  # rows of such neurons, windowed or not: the windowed path's candidates
        self.skip_settled = True
        """A neuron's second bound is refined only where the relaxation after it may read it (see :meth:`_tighten`)."""
        self.lower_first = True
        """With ``skip_settled``: neurons whose lower bound settles them may skip their upper-bound row."""
        self.dense_to_input = False
        """Whether neurons refined by dense passes (not on windows) go on to the input box after the stages
        that stop one mixing layer above it (see :meth:`_stages`); windowed neurons always do (cheap)."""
        self.min_settled = MIN_SETTLED
        """A node's next (deeper) stage runs only when its last one settled at least this fraction of the neurons
        it refined (see :data:`MIN_SETTLED`); 0 runs every stage."""
        self.stage_work = STAGE_WORK
        """See :data:`STAGE_WORK`."""
        self.stage_log: list[tuple[str, int, int, int]] = []
        """(node, stage index, neurons refined, neurons the relaxations still read after it), per stage run."""
        self._chains = {n: chain_below(self, n) for n in self.nodes if n in self.dependent and (
            self.keys[n] == "conv2d" or (self.keys[n] == "batch_norm" and self._above_conv(n)))}
        self._maps = {n: chain for n in self.nodes if self.keys[n] in _FLATTENS and n in self.dependent
                      and (chain := chain_below(self, n))}
        """Flattening nodes above a window chain: whole-map passes below them run on the windowed steps."""
        check_supported(gm)
        self.interval_only: set[str] = set()
        """Op keys of nodes some pass bounded by their interval instead of a relaxation (see :meth:`_run`)."""
        self.refined = self._refine_plan()
        self._pooled = {n: self._only_pooled(n) for n in self.nodes if n.name in self.refined}

    # -- structure ------------------------------------------------------------------------------
    def _above_conv(self, node: fx.Node) -> bool:
        sources = [s for s in node.all_input_nodes if s in self.dependent]
        return len(sources) == 1 and self.keys[sources[0]] == "conv2d"

    def _feeds_logits(self, node: fx.Node) -> bool:
        return node in self._logits_ancestors()

    def _logits_ancestors(self) -> set[fx.Node]:
        if not hasattr(self, "_ancestors"):
            out = next(n for n in reversed(self.nodes) if n.op == "output")
            seen: set[fx.Node] = set()
            stack = [a for a in out.all_input_nodes]
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.all_input_nodes)
            self._ancestors = seen
        return self._ancestors

    def _exact_on_a_box(self, node: fx.Node) -> bool:
        """True when interval bounds of ``node`` are already exact: at most one mixing affine op (linear or
        convolution) between the input box and it, and otherwise only moves and per-element affine maps."""
        mixing, stack, seen = 0, [node], set()
        while stack:
            n = stack.pop()
            if n in seen or n not in self.dependent:
                continue
            seen.add(n)
            key = self.keys[n]
            if n.op == "placeholder":
                continue
            if key in _MIXING:
                mixing += 1
            elif key not in _EXACT_ON_A_BOX:
                return False
            stack.extend(n.all_input_nodes)
        return mixing <= 1

    def _refine_plan(self) -> dict[str, list[Callable[[Interval], torch.Tensor]]]:
        """Node name -> the masks of the relaxations that read it (each: which of its neurons matter)."""
        plan: dict[str, list] = {}
        for node in self.nodes:
            rule = BACKWARD_RULES.find(self.keys[node])
            if rule is None or rule.relaxes is None or node not in self.dependent:
                continue
            for source in node.all_input_nodes:
                if source not in self.dependent or self.keys[source] in ACTIVATIONS:
                    continue
                if self.keys[source] not in BACKWARD_RULES:
                    continue  # a pass from it would stop at once on its own interval: nothing to gain
                if self._exact_on_a_box(source):
                    continue
                plan.setdefault(source.name, []).append(rule.relaxes)
        return plan

    # -- the forward pass -----------------------------------------------------------------------
    def bound_graph(self, box: Interval, method: str = "crown",
                    clamp: dict[str, Callable[[Interval], Interval]] | None = None,
                    pre_clamp: dict[str, Callable[[Interval], Interval]] | None = None,
                    reuse: BoundResult | None = None) -> BoundResult:
        """Bounds of every node over ``box``; with ``crown`` the planned nodes are refined by backward passes.

        ``pre_clamp`` is applied right after a node's refinement, ``clamp`` after that (both: what later
        nodes see and what is recorded).  ``reuse``: with ``crown``, the planned nodes take the bounds that
        result recorded, intersected with this run's intervals, instead of new backward passes -- sound only
        when every value this run bounds is one that result bounded (certify's clamped run: the inputs of the
        same box that raise no alarm); that run's passes did not see this run's clamps, so it is looser than
        refining again, and costs nothing.
        """
        check_method(method)
        self.memo = {}
        refine = method == "crown"
        names = [n.name for n in self.nodes]
        steps: dict[str, list[Callable]] = {}
        interpreter: IntervalInterpreter | None = None

        def refiner(name: str):
            node = next(n for n in self.nodes if n.name == name)
            before = reuse.nodes.get(name) if reuse is not None else None
            if isinstance(before, Interval):
                return lambda iv: Interval(torch.maximum(iv.lo, before.lo), torch.minimum(iv.hi, before.hi))
            return lambda iv: self.refine(interpreter.recorded, node, iv)

        if refine:
            for name in self.refined:
                steps.setdefault(name, []).append(refiner(name))
        for table in (pre_clamp or {}, clamp or {}):
            for name, fn in table.items():
                steps.setdefault(name, []).append(fn)

        def chain(fns):
            def run(iv):
                for fn in fns:
                    iv = fn(iv)
                return iv

            return run

        interpreter = IntervalInterpreter(self.gm, names, {k: chain(v) for k, v in steps.items()})
        output = interpreter.run(box)
        return BoundResult(output, interpreter.recorded, interpreter.rules_used)

    # -- backward passes ------------------------------------------------------------------------
    def _call(self, node: fx.Node, values: dict) -> Call:
        args = fx.map_arg(node.args, lambda n: values[n.name])
        kwargs = fx.map_arg(node.kwargs, lambda n: values[n.name])
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        return Call(self.gm, node, self.keys[node], tuple(args), dict(kwargs), module)

    def _collect(self, node: fx.Node, back: Back, values: dict, pending: dict) -> None:
        """File each contribution of ``back`` under the input node whose value it is: an Interval input's
        coefficients as a tensor; those of an item of a tuple-valued input (chunk, split, unbind) as
        ``{item index: tensor}``, which that node's own rule then passes on."""
        owners: dict[int, tuple[fx.Node, int | None]] = {}
        for source in node.all_input_nodes:
            value = values.get(source.name)
            if isinstance(value, Interval):
                owners.setdefault(id(value), (source, None))
            elif isinstance(value, (tuple, list)):
                for index, item in enumerate(value):
                    if isinstance(item, Interval):
                        owners.setdefault(id(item), (source, index))
        for value, coefficients in back.contributions:
            owner = owners.get(id(value))
            if owner is None:
                raise HardenError(f"bounds: backward rule of node {node.name!r} ({self.keys[node]}) returned "
                                  "coefficients for a value that is not one of its inputs")
            source, index = owner
            if index is not None:
                items = pending.setdefault(source, {})
                items[index] = entries.add(items[index], coefficients) if index in items else entries.dense(coefficients)
            elif source in pending:
                pending[source] = entries.add(pending[source], coefficients)
            else:
                pending[source] = coefficients

    def _run(self, values: dict, node: fx.Node, first: Back, stop: frozenset = frozenset()) -> torch.Tensor:
        """Lower bounds [R] of the rows ``first`` holds on ``node``'s inputs (plus its bias), down to the box
        (or to the intervals of the ``stop`` nodes, the first that the pass reaches)."""
        rows = first.rows
        total = torch.zeros(rows.shape[0], dtype=values[node.name].lo.dtype, device=rows.device) + first.bias
        pending: dict[fx.Node, torch.Tensor] = {}
        self._collect(node, first, values, pending)
        return self._drain(values, self.position[node], pending, total, rows, stop)

    def _drain(self, values: dict, end: int, pending: dict, total: torch.Tensor, rows: torch.Tensor,
               stop: frozenset) -> torch.Tensor:
        """``total`` plus the lower bound of the coefficients ``pending`` (by node, all before position ``end``)."""
        for n in reversed(self.nodes[:end]):
            A = pending.pop(n, None)
            if A is None:
                continue
            if isinstance(A, entries.Entry):
                if n.op == "placeholder" or n.name in stop:
                    total = total + A.box_lower(values[n.name], rows)
                    continue
                back = entries.step(self, n, values, A, rows)
                if back is not None:
                    total = total + back.bias
                    self._collect(n, back, values, pending)
                    continue
            A = entries.dense(A)
            if n.op == "placeholder" or n.name in stop:
                total = total + _box_lower_of(A, values[n.name], rows)
                continue
            if self.windowed and not pending and self._maps.get(n) is not None:
                chain = self._maps[n]
                shape = values[chain[0].name].shape if isinstance(values.get(chain[0].name), Interval) else None
                if shape is not None and len(shape) == 4:
                    lower = map_lower(self, values, chain, A.reshape((A.shape[0],) + tuple(shape[1:])), rows, stop)
                    if lower is not None:
                        self.rules_used.add(self.keys[n])
                        return total + lower
            back = self._backward(n, values, A, rows)
            if back is None:   # no relaxation: the node's own interval bounds the rest of the pass from below
                total = total + _box_lower_of(A, values[n.name], rows)
                continue
            total = total + back.bias
            self._collect(n, back, values, pending)
        return total

    def _backward(self, node: fx.Node, values: dict, A: torch.Tensor, rows: torch.Tensor) -> Back | None:
        """``A`` passed back through ``node`` by its rule, or None where the node has no rule (an op outside
        the registry, or a variant a rule refuses, e.g. a product of two input-dependent values) and its
        forward interval stands in for it: sound, as every value of the node lies in that interval, only
        looser than a relaxation would be.  The op is recorded in :attr:`interval_only`."""
        rule = BACKWARD_RULES.find(self.keys[node])
        if rule is not None:
            back = Back(self._call(node, values), A, rows, output=values[node.name], memo=self.memo)
            try:
                rule.backward(back)
            except HardenError:
                if not _has_intervals(values.get(node.name)):
                    raise
            else:
                self.rules_used.add(self.keys[node])
                return back
        if not _has_intervals(values.get(node.name)):
            raise HardenError(f"bounds: node {node.name!r} ({op_spelling(self.gm, node)}) has no backward rule "
                              "and no interval of its own to stand in for one")
        self.interval_only.add(self.keys[node])
        return None

    def _chunk_rows(self, values: dict, node: fx.Node, stop: frozenset = frozenset()) -> int:
        """Rows per chunk of a pass from ``node`` down to ``stop``: :attr:`row_budget` over :meth:`live_per_row`."""
        return max(2, self.row_budget // max(1, self.live_per_row(values, node, stop)))

    def live_per_row(self, values: dict, node: fx.Node, stop: frozenset = frozenset()) -> int:
        """Most coefficients one row of a dense pass from ``node`` to ``stop`` holds at once: those pending on every
        node the pass reached and has not passed yet (on a residual net the skip branch waits while the other is
        passed), plus :data:`TEMPORARIES` of the largest node it passes.  An upper bound: window and entry steps
        hold less."""
        return self._reach(values, node, stop)[0]

    def passed_per_row(self, values: dict, node: fx.Node, stop: frozenset = frozenset()) -> int:
        """Coefficients one row of a dense pass from ``node`` to ``stop`` runs through: the sizes of the nodes it
        passes (the work of a pass, up to the cost per coefficient of each step)."""
        return self._reach(values, node, stop)[1]

    def _reach(self, values: dict, node: fx.Node, stop: frozenset) -> tuple[int, int]:
        key = (node.name, stop, tuple(tuple(v.shape[1:]) for v in values.values() if isinstance(v, Interval)))
        cached = self.__dict__.setdefault("_live", {}).get(key)
        if cached is not None:
            return cached

        def size(n):
            v = values.get(n.name)
            if isinstance(v, Interval):
                return int(v.lo[0].numel())
            if isinstance(v, (tuple, list)):
                return sum(int(i.lo[0].numel()) for i in v if isinstance(i, Interval))
            return 0

        # the nodes a pass reaches (stop nodes and the input: reached, not passed), and the last position from
        # which each one waits
        reached, waits, stack = {node}, {node: self.position[node]}, [node]
        while stack:
            n = stack.pop()
            if n is not node and (n.name in stop or n.op == "placeholder"):
                continue
            for s in n.all_input_nodes:
                if s in self.dependent:
                    waits[s] = max(waits.get(s, -1), self.position[n])
                    if s not in reached:
                        reached.add(s)
                        stack.append(s)
        events = sorted((self.position[n], waits[n], size(n)) for n in reached)
        peak, largest = 0, max(size(n) for n in reached)
        for position, _, _ in events:
            # pending while passing the node at ``position``: reached below it, waited on from it or above
            peak = max(peak, sum(sz for p, w, sz in events if p <= position <= w))
        passed = sum(size(n) for n in reached if n is node or not (n.name in stop or n.op == "placeholder"))
        cached = self._live[key] = (peak + TEMPORARIES * largest, passed)
        return cached

    def neuron_lower(self, values: dict, node: fx.Node, rows: torch.Tensor, neuron: torch.Tensor,
                     sign: torch.Tensor, stop: frozenset = frozenset()) -> torch.Tensor:
        """Lower bounds [R] of ``sign * node[sample rows, flat neuron]``."""
        if not stop and self._chains.get(node) is not None:
            self.chain_rows += int(rows.shape[0])
        if self.windowed and not stop and self._chains.get(node) is not None:
            lower = conv_neuron_lower(self, values, node, self._chains[node], rows, neuron, sign)
            if lower is not None:
                self.rules_used.add(self.keys[node])
                self.windowed_rows += int(rows.shape[0])
                return lower
        iv = values.get(node.name)
        if not isinstance(iv, Interval):
            raise HardenError(f"bounds: node {node.name!r} has no recorded shape")
        # one entry per row until a mixing layer writes its weights (see harden.bounds.entries); where no rule
        # takes the node, its own interval bounds the row (the neuron keeps its interval bound)
        total = torch.zeros(rows.shape[0], dtype=iv.lo.dtype, device=rows.device)
        pending = {node: entries.Entry(neuron, sign, tuple(iv.shape[1:]))}
        return self._drain(values, self.position[node] + 1, pending, total, rows, stop)

    def _mixing_depth(self) -> dict[str, int]:
        """Per node, the most linear or convolution layers on any path from the input to it."""
        depth: dict[str, int] = {}
        for node in self.nodes:
            if node not in self.dependent:
                continue
            below = max((depth[s.name] for s in node.all_input_nodes if s.name in depth), default=0)
            depth[node.name] = below + (self.keys[node] in _MIXING)
        return depth

    def _stages(self, node: fx.Node) -> list[frozenset]:
        """Where the passes refining ``node`` stop, cheapest first: the nodes at most m mixing layers deep, for
        m = d - 2, d - 4, d - 8, ... (d: the node's depth) while above 1, then m = 1, then the input box (an empty
        stop set) -- the box only for windowed neurons, for a node with no earlier stage, or with
        ``dense_to_input``."""
        # m = d - 1 is left out: a pass that stops one mixing layer below the node reads that layer's input
        # intervals, which is what the interval bounds of the node did (on a ResNet every refined node is a
        # batch norm or a residual add, at the depth of its convolution: the stage changed nothing there).
        # Geometric steps: a pass to depth m costs about d - m layers, so the stages of a node cost about
        # twice its deepest one, where stopping at every depth cost d / 2 times it.
        d = self.depth[node.name]
        depths, step = [], 2
        while d - step > 1:
            depths.append(d - step)
            step *= 2
        if d - 1 > 1:
            depths.append(1)
        stages = [frozenset(n for n, k in self.depth.items() if k <= m) for m in depths]
        if stages and not self.dense_to_input and self._chains.get(node) is None:
            # The last cheap stage stops at nodes one mixing layer deep, whose interval bounds are exact
            # per neuron; going on to the box gains only the first layer's correlations, through the
            # widest maps (measured on LeNet-5, eps 0.01: 1 of 182 certificates for ~12 of ~31 ms).
            return stages
        return [*stages, frozenset()]

    def _only_pooled(self, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """(relu, max pool) when ``node`` feeds only a ReLU that feeds only a max pool (conv - ReLU - pool)."""
        users = list(node.users)
        if len(users) != 1 or self.keys[users[0]] != "relu":
            return None
        relu = users[0]
        after = list(relu.users)
        if len(after) != 1 or self.keys[after[0]] != "max_pool2d" or after[0].all_input_nodes != [relu]:
            return None
        return relu, after[0]

    def _read_by_pool(self, node: fx.Node, iv: Interval) -> torch.Tensor | None:
        """The neurons of ``node`` whose ReLU output some max-pool window may read (see
        :func:`harden.bounds.backward_pooling.entries_read`); the others need no refinement."""
        pair = self._pooled.get(node)
        if pair is None:
            return None
        relu, pool = pair
        out = Interval(iv.lo.clamp(min=0), iv.hi.clamp(min=0))
        try:
            x, g = _pool_geometry(self._call(pool, {relu.name: out}))
        except HardenError:
            return None
        return entries_read(x, g)

    def _mask(self, node: fx.Node, iv: Interval) -> torch.Tensor:
        mask = None
        for relaxes in self.refined[node.name]:
            m = relaxes(iv)
            mask = m if mask is None else mask | m
        read = self._read_by_pool(node, iv)
        if read is not None:
            mask = mask & read
        n = iv.shape[0]
        return mask.reshape(n, -1) & (iv.lo <= iv.hi).reshape(n, -1)

    def _tighten(self, values: dict, node: fx.Node, iv: Interval, stop: frozenset) -> Interval:
        n = iv.shape[0]
        picked = self._mask(node, iv).nonzero()                              # [M, 2]: sample, neuron
        if picked.shape[0] == 0:
            return iv
        lo, hi = iv.lo.reshape(n, -1).clone(), iv.hi.reshape(n, -1).clone()
        s, j = picked[:, 0], picked[:, 1]
        # One bound first, the other then only where the neuron is still unstable, when the relaxation after the
        # node ignores it there (each saves 10-30% of the rows on LeNet-5 at eps 0.01; see docs/results/certify.md):
        # * every reader a ReLU: on a neuron with upper bound <= 0 it is the constant 0 whatever the lower bound,
        #   and below a max pool an entry no window reads once the upper bounds are refined needs no lower bound;
        # * those ReLUs read only by linear layers / convolutions: on a neuron with lower bound >= 0 the ReLU is the
        #   identity whatever the upper bound, which then only feeds later interval bounds (looser, still sound).
        # The first bound of each neuron is the one its interval's centre points to (likelier to settle it).
        dead_is_zero, active_is_identity = self._relu_only(node) if self.skip_settled else (False, False)
        first = torch.full((s.shape[0],), -1.0, dtype=lo.dtype, device=lo.device)
        if active_is_identity and self.lower_first:
            first = torch.where(lo[s, j] + hi[s, j] > 0, -first, first)
        bound = self._lower_in_chunks(values, node, s, j, first, stop)
        up = first < 0
        hi[s, j] = torch.where(up, torch.minimum(hi[s, j], -bound), hi[s, j])
        lo[s, j] = torch.where(up, lo[s, j], torch.maximum(lo[s, j], bound))
        need = torch.ones_like(up)
        if dead_is_zero:
            read = self._read_by_pool(node, Interval(lo.reshape(iv.shape), hi.reshape(iv.shape)))
            need = hi[s, j] > 0
            if read is not None:
                need &= read.reshape(n, -1)[s, j]
            if active_is_identity:
                need = torch.where(up, need, lo[s, j] < 0)
        again = need.nonzero().squeeze(1)
        if again.shape[0]:
            s, j, second = s.index_select(0, again), j.index_select(0, again), -first.index_select(0, again)
            bound = self._lower_in_chunks(values, node, s, j, second, stop)
            up = second < 0
            hi[s, j] = torch.where(up, torch.minimum(hi[s, j], -bound), hi[s, j])
            lo[s, j] = torch.where(up, lo[s, j], torch.maximum(lo[s, j], bound))
        return Interval(lo.reshape(iv.shape), hi.reshape(iv.shape))

    def _lower_in_chunks(self, values, node, rows, neuron, sign, stop) -> torch.Tensor:
        step = self._chunk_rows(values, node, stop)
        return torch.cat([self.neuron_lower(values, node, rows[i:i + step], neuron[i:i + step], sign[i:i + step], stop)
                          for i in range(0, rows.shape[0], step)])

    def _relu_only(self, node: fx.Node) -> tuple[bool, bool]:
        """(every reader of ``node`` is a ReLU, and those ReLUs are read only by linear layers / convolutions)."""
        relus = list(node.users)
        if not relus or any(self.keys[u] != "relu" for u in relus):
            return False, False
        return True, all(self.keys[v] in _MIXING for u in relus for v in u.users)

    def refine(self, values: dict, node: fx.Node, iv: Interval) -> Interval:
        """``iv`` tightened by backward passes at the neurons the relaxations after ``node`` read.

        In stages, cheapest first (:meth:`_stages`): a pass that stops at the intervals two mixing layers
        below, then deeper, and only the neurons still unstable go on to the next stage; the last stage
        stops one mixing layer above the input (windowed neurons: at the input box).  A neuron settled
        early would gain nothing later: a relaxation is exact on a stable neuron.  A stage that settles
        fewer than :attr:`min_settled` of its neurons is the node's last (:data:`MIN_SETTLED`) unless the
        next one is cheap (:attr:`stage_work`).
        """
        values = dict(values)
        stages = self._stages(node)
        for i, stop in enumerate(stages):
            values[node.name] = iv
            before = int(self._mask(node, iv).sum())
            if before == 0:
                break
            iv = self._tighten(values, node, iv, stop)
            left = int(self._mask(node, iv).sum())
            self.stage_log.append((node.name, i, before, left))
            if i + 1 < len(stages) and before - left < self.min_settled * before:
                # a deeper stage after one that settled (almost) nothing: only while it is cheap
                work = 2 * left / max(1, iv.shape[0]) * self.passed_per_row(values, node, stages[i + 1])
                if work > self.stage_work:
                    break
        return iv

    # -- the specification ----------------------------------------------------------------------
    def margin_lower(self, values: dict, y: torch.Tensor, fold: fx.Node | None) -> torch.Tensor:
        """Per sample, a lower bound of min_{j != y} (logit_y - logit_j); the margin rows W_y - W_j are folded
        into ``fold`` (the last linear layer) when given."""
        out = next(n for n in reversed(self.nodes) if n.op == "output")
        logits = out.args[0]
        if not isinstance(logits, fx.Node) or not isinstance(values.get(logits.name), Interval):
            raise HardenError("certify needs an input-dependent logits tensor as the graph's output")
        n = y.shape[0]
        k = values[logits.name].shape[1]
        if values[logits.name].dim() != 2:
            raise HardenError(f"certify needs logits [N, K]; got {tuple(values[logits.name].shape)}")
        if k < 2:   # no other class: the margin is vacuous
            return torch.full((n,), float("inf"), dtype=values[logits.name].dtype, device=y.device)
        per_chunk = max(1, self._chunk_rows(values, fold if fold is not None else logits) // (k - 1))
        parts = []
        for start in range(0, n, per_chunk):
            ys = y[start:start + per_chunk]
            samples = torch.arange(start, start + ys.shape[0], device=y.device)
            parts.append(self._margin_chunk(values, ys, samples, k, logits, fold))
        return torch.cat(parts).reshape(n, k - 1).amin(dim=1)

    def _margin_chunk(self, values, ys, samples, k, logits, fold) -> torch.Tensor:
        """Lower bounds of logit_y - logit_j, one row per sample and class j != y (the row j = y is 0)."""
        classes = torch.arange(k, device=ys.device)
        others = classes.expand(ys.shape[0], k)[classes.unsqueeze(0) != ys.unsqueeze(1)].reshape(-1, k - 1)
        rows = samples.repeat_interleave(k - 1)
        if fold is not None:
            call = self._call(fold, values)
            x, weight, bias = linear_parts(call)
            self.rules_used.add("linear")
            if x.dim() == 2:
                first = Back(call, None, rows)
                first.emit(x, (weight[ys].unsqueeze(1) - weight[others]).reshape(rows.shape[0], -1))
                if bias is not None:
                    first.add_bias((bias[ys].unsqueeze(1) - bias[others]).reshape(-1))
                return self._run(values, fold, first)
        iv = values[logits.name]
        eye = torch.eye(k, dtype=iv.dtype, device=iv.device)
        A = (eye[ys].unsqueeze(1) - eye[others]).reshape(rows.shape[0], k)
        first = self._backward(logits, values, A, rows)
        if first is None:
            return box_lower(A, iv, rows)
        return self._run(values, logits, first)


def linear_bounds(gm: fx.GraphModule, box: Interval, method: str = "crown", **kwargs) -> BoundResult:
    """Bounds of every node of ``gm`` over ``box`` (see :class:`LinearBounds`)."""
    return LinearBounds(gm).bound_graph(box, method, **kwargs)

