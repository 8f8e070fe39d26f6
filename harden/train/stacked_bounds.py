"""Natural pass and interval bounds in ONE training forward: natural, lower and upper values stacked together.

The CTT losses need, per batch, the model's logits, the natural pre-activations at the trap sites and their
interval bounds over the eps-box.  ``harden.bounds.propagate`` is general and fast without autograd, but with
autograd its no-grad tricks are off and the bounds pass runs beside a separate natural pass.  Training only needs
a handful of layer kinds, so this module runs the graph once on ``[x, lo, hi]`` stacked:

- a monotone or purely structural op (ReLU, pooling, flatten, ...) maps natural, lower and upper values alike, so
  it runs unchanged on the stacked values (one call instead of three);
- an affine layer works in centre/radius form (W c + b, |W| r: two products, not four) and re-stacks
  ``[natural, centre - radius, centre + radius]``.  A 2-d convolution does it as one grouped convolution on
  values stacked on the channels, channels-last (``_Channels``), which ReLU and pooling keep; a linear layer or
  batch norm on values stacked on the batch (3N samples);
- a ReLU read only by a max pooling runs after it instead (``_pool_before_activation``);
- after the last trap site (or the ``through`` node, the input of the logits layer, when the margin's bounds are
  wanted) only the natural part goes on (to the logits).

Caps (the detect-or-robust certificate): each trap's upper bound is intersected with its no-alarm limit right
where it is recorded, so every later bound is that of the inputs that raise no alarm.

These are the same interval rules as ``harden.bounds`` (paper 000, eq. 3-4), so the values equal
``propagate``'s to rounding.  Any other op makes :func:`stacked_runner` return None and the caller keeps the
general path; :func:`stacked_runner` also checks the result against the general path once before it is used.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.bounds.interval import Interval
from harden.bounds.propagate import input_dependent
from harden.graph.ops import canonical_op, is_inplace

# Ops that commute with stacking: monotone non-decreasing element-wise maps, max / average pooling (monotone in
# every input), and reshapes that keep the batch dimension.  ``size`` / ``getattr`` let ``x.view(x.size(0), -1)``
# see the stacked batch size, which is what the stacked reshape needs.
STACKABLE = {"relu", "relu6", "hardtanh", "leaky_relu", "sigmoid", "tanh", "max_pool2d", "avg_pool2d",
             "adaptive_avg_pool2d", "flatten", "reshape", "identity", "size", "getattr"}


def _radius_conv(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda r: module._conv_forward(r, module.weight.abs(), None)


def _radius_linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda r: F.linear(r, module.weight.abs())


def _radius_batch_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def radius(r: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return r * scale.abs().reshape((1, -1) + (1,) * (r.dim() - 2))
    return radius


# Affine modules by type: how to push a radius through the layer's linear part (|W| r).
AFFINE_MODULES: dict[type, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    nn.Conv1d: _radius_conv, nn.Conv2d: _radius_conv, nn.Linear: _radius_linear,
    nn.BatchNorm1d: _radius_batch_norm, nn.BatchNorm2d: _radius_batch_norm,
}


class _Channels:
    """A value stacked on the channels instead: (N, 3C, H, W) channels-last, channels [natural | lower | upper].

    Convolutions run on this layout as one grouped convolution (oneDNN's grouped convolution is fast on
    channels-last), and channel-wise ops (ReLU, pooling) keep it, so a conv / ReLU / pool stack never
    re-arranges its largest tensors; any other op first gets the batch-stacked layout back (``to_batch``).
    """

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    def to_batch(self) -> torch.Tensor:
        n, c3 = self.t.shape[:2]
        return self.t.reshape(n, 3, c3 // 3, *self.t.shape[2:]).transpose(0, 1).reshape(3 * n, c3 // 3, *self.t.shape[2:])

    @classmethod
    def from_batch(cls, x: torch.Tensor, n: int) -> "_Channels":
        shape = x.shape[1:]
        stacked = x.reshape(3, n, *shape).transpose(0, 1).reshape(n, 3 * shape[0], *shape[1:])
        return cls(stacked.contiguous(memory_format=torch.channels_last))


# Ops that keep the channel-stacked layout: channel-wise and monotone (so they map lower and upper bounds alike).
CHANNELWISE = {"relu", "relu6", "hardtanh", "leaky_relu", "sigmoid", "tanh", "max_pool2d", "avg_pool2d",
               "adaptive_avg_pool2d", "identity"}

_MIXERS: dict[tuple, torch.Tensor] = {}


def _mixer(kind: str, c: int, like: torch.Tensor) -> torch.Tensor:
    """(3c x 3c) channel maps: "in" [x, l, u] -> [x, u + l, u - l]; "out" [x, c, r] -> [x, c - r, c + r]."""
    key = (kind, c, like.device, like.dtype)
    if key not in _MIXERS:
        eye = torch.eye(c, dtype=like.dtype, device=like.device)
        m = torch.zeros(3 * c, 3 * c, dtype=like.dtype, device=like.device)
        m[:c, :c] = eye
        if kind == "in":   # rows: source blocks [x, l, u]; columns: result blocks
            m[c:2 * c, c:2 * c], m[2 * c:, c:2 * c] = eye, eye
            m[c:2 * c, 2 * c:], m[2 * c:, 2 * c:] = -eye, eye
        else:              # rows: [x, c, r]
            m[c:2 * c, c:2 * c], m[2 * c:, c:2 * c] = eye, -eye
            m[c:2 * c, 2 * c:], m[2 * c:, 2 * c:] = eye, eye
        _MIXERS[key] = m
    return _MIXERS[key]


def _mix(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Channel map of a channels-last tensor: one matrix product over its (contiguous) channel axis."""
    return torch.matmul(t.permute(0, 2, 3, 1), m).permute(0, 3, 1, 2)


def _channel_conv(module: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """[x, l, u] (channels) through a convolution: one grouped convolution of [x, u + l, u - l] with
    [W, W / 2, |W| / 2] and bias [b, b, 0] gives [natural, centre, radius] (W c + b, |W| r), then [x, c - r, c + r]."""
    w, b = module.weight, module.bias
    half = w * 0.5
    mixed = _mix(t, _mixer("in", t.shape[1] // 3, t))
    bias = None if b is None else torch.cat([b, b, torch.zeros_like(b)])
    out = F.conv2d(mixed, torch.cat([w, half, half.abs()]), bias, module.stride, module.padding,
                   module.dilation, 3 * module.groups)
    return _mix(out, _mixer("out", w.shape[0], out))


class _Tap(torch.autograd.Function):
    """(x, x's values at flat positions ``indices`` of ``flat(x)``) with a cheap backward.

    Gathering beside the later layers that read ``x`` would make autograd fill a zero tensor of x's size for
    the gather's gradient and then add it to the layers' gradient: two passes over one of the largest tensors
    of the step.  Here the few gathered gradients are added into a copy of the layers' gradient instead.
    ``channels``: x is channel-stacked (channels-last), read through its [N, H*W*C] view.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor, channels: bool):
        ctx.save_for_backward(indices)
        ctx.shape, ctx.channels = x.shape, channels
        return x.view_as(x), _Tap.flat(x, channels).index_select(1, indices)

    @staticmethod
    def flat(x: torch.Tensor, channels: bool) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(len(x), -1) if channels else x.reshape(len(x), -1)

    @staticmethod
    def backward(ctx, grad_x, grad_masked):
        (indices,) = ctx.saved_tensors
        layout = torch.channels_last if ctx.channels else torch.contiguous_format
        if grad_x is None:
            grad_x = grad_masked.new_zeros(ctx.shape).contiguous(memory_format=layout)
        else:
            grad_x = grad_x.clone(memory_format=layout)
        if grad_masked is not None:
            _Tap.flat(grad_x, ctx.channels).index_add_(1, indices, grad_masked)
        return grad_x, None, None


def _channel_indices(indices: torch.Tensor, c: int, hw: int) -> torch.Tensor:
    """Flat (C, H, W) positions -> positions of [natural, lower, upper] in the channel-stacked [H, W, 3C] view."""
    channel, pixel = indices // hw, indices % hw
    return torch.cat([pixel * 3 * c + part * c + channel for part in range(3)])


def _capped(value: torch.Tensor, indices: torch.Tensor, cap: torch.Tensor, channels: bool, n: int) -> torch.Tensor:
    """``value`` (stacked [natural, lower, upper]) with the upper part at flat positions ``indices`` lowered to
    ``cap``: one element-wise minimum against a dense limit (+inf elsewhere), differentiable in ``cap`` too."""
    if channels:
        c3, hw = value.shape[1], value.shape[2:].numel()
        positions = _channel_indices(indices, c3 // 3, hw)[2 * len(indices):]      # the upper part
        dense = torch.full((c3 * hw,), float("inf"), dtype=value.dtype, device=value.device).scatter(0, positions, cap)
        limit = dense.reshape(1, *value.shape[2:], c3).permute(0, 3, 1, 2)       # channels-last, like value
        return torch.minimum(value, limit)
    per_sample = value.shape[1:].numel()
    dense = torch.full((3, 1, per_sample), float("inf"), dtype=value.dtype, device=value.device)
    dense = dense.index_put((torch.tensor([2], device=value.device), torch.tensor([0], device=value.device),
                             indices), cap)
    return torch.minimum(value.reshape(3, n, per_sample), dense).reshape(value.shape)


class _Stacked(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, torch.Tensor], last: fx.Node,
                 dependent: set[fx.Node], through: str | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = dict(wanted)
        self.last = last
        self.through = through
        self.dependent = dependent
        self.n = 0
        self.natural_only = False
        self.caps: dict[str, torch.Tensor] = {}
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.full: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.overwritten = {n for n in gm.graph.nodes if any(is_inplace(gm, u) for u in n.users)}
        self.keys = {n: canonical_op(gm, n) for n in gm.graph.nodes}

    def run_node(self, n: fx.Node):
        if self.natural_only or n not in self.dependent or n.op == "placeholder":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        first = args[0] if args else None
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and len(args) == 1 and not kwargs:
            channels = first if isinstance(first, _Channels) else _Channels.from_batch(first, self.n)
            result = _Channels(_channel_conv(module, channels.t))
        elif isinstance(first, _Channels) and self.keys[n] in CHANNELWISE \
                and not _holds_channels(args[1:]) and not _holds_channels(kwargs):
            result = _Channels(getattr(self, n.op)(n.target, (first.t,) + tuple(args[1:]), kwargs))
        else:
            args, kwargs = fx.node.map_aggregate((args, kwargs), _batch)
            if module is not None and type(module) in AFFINE_MODULES:
                result = self.affine(module, args[0])
            else:
                result = getattr(self, n.op)(n.target, args, kwargs)
        if n.name in self.wanted:
            # gathered at the masked positions on the stacked tensor: one gather (and one backward) per site
            channels = isinstance(result, _Channels)
            value = result.t if channels else result
            indices = self.wanted[n.name]
            if channels:
                indices = _channel_indices(indices, value.shape[1] // 3, value.shape[2:].numel())
            value, masked = _Tap.apply(value, indices, channels)
            self.recorded[n.name] = masked.chunk(3, dim=1) if channels else masked.split(self.n)
            if n.name in self.caps:
                value = _capped(value, self.wanted[n.name], self.caps[n.name], channels, self.n)
            elif n in self.overwritten:
                value = value.clone()  # an in-place user (ReLU(inplace=True)) would overwrite what was recorded
            result = _Channels(value) if channels else value
        if n.name == self.through:
            self.full = tuple(_batch(result).split(self.n))
        if n is self.last:
            # Past the last trap only the natural values are needed: keep the natural part of every live value.
            self.natural_only = True
            for node, value in list(self.env.items()):
                if node in self.dependent and node is not n:
                    self.env[node] = self.natural(value)
            result = self.natural(result)
        return result

    def natural(self, value):
        if isinstance(value, _Channels):
            return value.t[:, : value.t.shape[1] // 3]
        return value[: self.n] if isinstance(value, torch.Tensor) else value

    def affine(self, module: nn.Module, stacked: torch.Tensor) -> torch.Tensor:
        """[natural, lower, upper] through an affine layer: natural and centre in one call, radius with |W|."""
        nat, lo, hi = stacked.split(self.n)
        natural, centre = module(torch.cat([nat, (hi + lo) * 0.5])).split(self.n)
        radius = AFFINE_MODULES[type(module)](module)((hi - lo) * 0.5)
        return torch.cat([natural, centre - radius, centre + radius])

    def forward(self, x: torch.Tensor, box: Interval, order: list[str], caps: dict[str, torch.Tensor] | None = None):
        self.n, self.natural_only, self.recorded, self.full = len(x), False, {}, None
        self.caps = dict(caps or {})
        logits = self.run(torch.cat([x, box.lo, box.hi]))
        records = [self.recorded[name] for name in order]
        return (logits, records) if self.through is None else (logits, records, self.full)


def _batch(value):
    return value.to_batch() if isinstance(value, _Channels) else value


def _holds_channels(value) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, _Channels)))
    return any(found)


def stackable(gm: fx.GraphModule, names: list[str]) -> bool:
    """True when every input-dependent op up to the last of ``names`` is affine or stackable."""
    dependent = input_dependent(gm)
    remaining = set(names)
    for node in gm.graph.nodes:
        if not remaining:
            return True
        remaining.discard(node.name)
        if node not in dependent or node.op == "placeholder":
            continue
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in AFFINE_MODULES:
            if isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm) \
                    and gm.get_submodule(node.target).running_var is None:
                return False
            continue
        if canonical_op(gm, node) not in STACKABLE:
            return False
    return not remaining


def _pool_before_activation(gm: fx.GraphModule, keep: set[str]) -> fx.GraphModule:
    """A copy of ``gm`` (parameters shared) where ``maxpool(relu(z))`` runs as ``relu(maxpool(z))``.

    A monotone non-decreasing f commutes with a maximum (f(max z) = max f(z)), so values and gradients are
    unchanged, but the ReLU (and its backward) then runs on a quarter of the elements: on the stacked batch
    the first ReLU is one of the largest tensors of the pass.  Only a ReLU read by that one pooling alone,
    and not itself wanted, is moved.
    """
    graph = copy.deepcopy(gm.graph)
    copy_gm = fx.GraphModule(gm, graph)
    for node in list(graph.nodes):
        if canonical_op(copy_gm, node) != "relu" or node.name in keep or len(node.users) != 1:
            continue
        pool = next(iter(node.users))
        if not _plain_max_pool(copy_gm, pool) or pool.args[0] is not node:
            continue
        (source,) = node.all_input_nodes
        pool.replace_input_with(node, source)
        pool.append(node)                           # the ReLU now follows the pooling ...
        node.replace_input_with(source, pool)       # ... and reads it
        pool.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    graph.lint()
    copy_gm.recompile()
    return copy_gm


def _plain_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module" or canonical_op(gm, node) != "max_pool2d":
        return False
    return not gm.get_submodule(node.target).return_indices


def stacked_runner(gm: fx.GraphModule, masks: dict[str, torch.Tensor], through: str | None = None):
    """``run(x, box, order, caps=None) -> (logits, [(natural, lower, upper) at the masked positions, per name in
    order])`` over one stacked pass, or None when the graph holds an op this module does not stack (the caller
    then uses the natural pass plus ``propagate``).  ``masks`` maps node names to flat positions.

    ``caps`` (name -> limits [count]): the upper bounds at those masked positions are lowered to the limits
    before later layers read them (what is recorded is the bound before).  ``through``: bounds go on to that
    node (the logits layer's input) and ``run`` returns its whole (natural, lower, upper) third."""
    names = list(masks)
    if not stackable(gm, names + ([through] if through else [])):
        return None
    gm = _pool_before_activation(gm, set(names) | ({through} if through else set()))
    dependent = input_dependent(gm)
    ends = set(names) | ({through} if through else set())
    last = [n for n in gm.graph.nodes if n.name in ends][-1]
    interpreter = _Stacked(gm, masks, last, dependent, through)
    return interpreter.forward


def checked_once(owner, reference: Callable[[], object], stacked: Callable[[], object],
                 close: Callable[[object, object], bool], agree: Callable[[bool], bool] = lambda ok: ok):
    """The result of ``owner``'s stacked pass once it has agreed with the general one.

    ``owner`` holds ``stacked`` (the runner, or None) and ``stacked_checked``.  On the first call both passes run
    and the general result is returned; a stacked pass that raises (an op that does not stack after all, e.g. a
    shape built from a constant) or that ``close`` finds off (``agree`` joins the verdicts of several ranks) sets
    ``owner.stacked`` to None for good.  Later calls run the stacked pass alone."""
    if owner.stacked is None:
        return reference()
    if owner.stacked_checked:
        return stacked()
    owner.stacked_checked = True
    result = reference()
    try:
        agrees = close(result, stacked())
    except Exception:  # noqa: BLE001 - any failure of the fast path means: use the general one
        agrees = False
    if not agree(agrees):
        owner.stacked = None
    return result
