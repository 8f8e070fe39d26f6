"""Backward passes of single neurons of a convolution through a convolutional chain, on windows only.

A convolution neuron depends on a small window of its input, that window on a slightly larger
window of the layer before, and so on down to the image.  Refining every unstable neuron of a
second convolution by dense backward passes touches whole feature maps per row (mostly zeros);
here each row carries only its window [C, h, w] and the position of the window's corner, and
every relaxation parameter is gathered for that window.  Same relaxations, same result as the
dense pass (tests compare them), a fraction of the work.

Handles chains of conv2d (groups 1, zero padding), eval-mode batch_norm, relu and max_pool2d down to a 4-d
input box; :func:`chain_below` returns None for anything else and the dense pass is used.  A batch norm right
above a convolution starts a chain too (its neuron is the convolution's, scaled and shifted).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from harden.bounds.backward import flat_sum
from harden.bounds.backward_activations import relu_relaxation
from harden.bounds.backward_affine import _conv_params, batch_norm_affine
from harden.bounds.backward_pooling import _geometry, _relaxation
from harden.bounds.interval import Interval
from harden.errors import HardenError

WINDOW_OPS = frozenset({"conv2d", "batch_norm", "relu", "max_pool2d"})


def chain_below(engine, node: fx.Node) -> list[fx.Node] | None:
    """The nodes from ``node``'s input down to the placeholder when the path is one chain of window ops."""
    chain = []
    current = node
    while True:
        sources = [s for s in current.all_input_nodes if s in engine.dependent]
        if len(sources) != 1:
            return None
        current = sources[0]
        if current.op == "placeholder":
            return chain
        if engine.keys[current] not in WINDOW_OPS:
            return None
        chain.append(current)


def _crop(maps: torch.Tensor, rows: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, a: int, b: int,
          fill: float = 0.0) -> torch.Tensor:
    """[R, C, a, b]: the window of ``maps[rows]`` [N, C, H, W] whose corner is (oy, ox); outside the map ``fill``."""
    n, c, h, w = maps.shape
    top, left = max(0, -int(oy.min())), max(0, -int(ox.min()))
    bottom, right = max(0, int(oy.max()) + a - h), max(0, int(ox.max()) + b - w)
    if top or left or bottom or right:
        maps = F.pad(maps, (left, right, top, bottom), value=fill if maps.is_floating_point() else int(fill))
    hp, wp = maps.shape[2:]
    ys = (oy + top).unsqueeze(1) + torch.arange(a, device=oy.device)              # [R, a]
    xs = (ox + left).unsqueeze(1) + torch.arange(b, device=ox.device)             # [R, b]
    channel = torch.arange(c, device=oy.device) * (hp * wp)
    index = (rows * (c * hp * wp)).view(-1, 1, 1, 1) + channel.view(1, -1, 1, 1) \
        + (ys * wp).view(-1, 1, a, 1) + xs.view(-1, 1, 1, b)
    return maps.reshape(-1)[index]


TABLE_BUDGET = 1 << 25
"""Largest per-window table (entries) :func:`_crop_rows` keeps; beyond it windows are gathered entry by entry."""


class _Grid:
    """Where a row's window sits: corner = position * scale + offset per axis, position in [0, count).

    Every row of one pass starts at a neuron of the same convolution, so its window corners at every
    level of the chain lie on one grid; tables unfolded on that grid turn a window into one row.
    """

    def __init__(self, y, x, scale, offset, count):
        self.y, self.x, self.scale, self.offset, self.count = y, x, scale, offset, count

    def down(self, stride, padding) -> "_Grid":
        scale = tuple(s * t for s, t in zip(self.scale, stride))
        offset = tuple(o * t - p for o, t, p in zip(self.offset, stride, padding))
        return _Grid(self.y, self.x, scale, offset, self.count)


def _crop_rows(engine, what: str, maps: torch.Tensor, rows, oy, ox, grid: _Grid, a: int, b: int) -> torch.Tensor:
    """As :func:`_crop` (fill 0), but by one contiguous row gather from a table [N * positions, C a b] unfolded
    once per bounds object: the windows of all grid positions of every sample (sample-major)."""
    n, c, h, w = maps.shape
    (sy, sx), (oy0, ox0), (ny, nx) = grid.scale, grid.offset, grid.count
    if n * ny * nx * c * a * b > TABLE_BUDGET:
        return _crop(maps, rows, oy, ox, a, b)

    def table():
        top, left = max(0, -oy0), max(0, -ox0)
        bottom, right = max(0, oy0 + (ny - 1) * sy + a - h), max(0, ox0 + (nx - 1) * sx + b - w)
        padded = F.pad(maps, (left, right, top, bottom)) if top or left or bottom or right else maps
        padded = padded[:, :, oy0 + top:oy0 + top + (ny - 1) * sy + a, ox0 + left:ox0 + left + (nx - 1) * sx + b]
        # [N, ny, nx, C, a, b] as a strided view of the maps, copied once into the table's layout (unfold
        # plus a transpose copied twice and was slow for a window as large as the map)
        s0, s1, s2, s3 = padded.stride()
        view = padded.as_strided((n, ny, nx, c, a, b), (s0, sy * s2, sx * s3, s1, s2, s3), padded.storage_offset())
        return view.reshape(n * ny * nx, c * a * b)

    key = f"{what}-table{(a, b, sy, sx, oy0, ox0, ny, nx)}"
    flat = _remember(engine, key, maps, table)
    index = rows * (ny * nx) + grid.y * nx + grid.x
    return flat.index_select(0, index).reshape(rows.shape[0], c, a, b)


def _inside(oy, ox, a: int, b: int, h: int, w: int, dtype) -> torch.Tensor:
    """[R, 1, a, b]: 1 where the window entry lies on the map, 0 on padding."""
    ys = oy.unsqueeze(1) + torch.arange(a, device=oy.device)
    xs = ox.unsqueeze(1) + torch.arange(b, device=ox.device)
    row_ok = ((ys >= 0) & (ys < h)).to(dtype)
    col_ok = ((xs >= 0) & (xs < w)).to(dtype)
    return (row_ok.unsqueeze(2) * col_ok.unsqueeze(1)).unsqueeze(1)


def _pairs(v) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    return v * 2 if len(v) == 1 else v


def _conv_window(engine, values, node, A, oy, ox, total, grid):
    """Through a convolution: A [R, Co, a, b] at the output corner (oy, ox) -> the input window."""
    x, p = _conv_params(engine._call(node, values))
    weight, bias = p["weight"], p["bias"]
    if p["groups"] != 1 or isinstance(p["padding"], str) or p.get("pre_pad") is not None:
        raise _NotWindowed
    stride, padding, dilation = _pairs(p["stride"]), _pairs(p["padding"]), _pairs(p["dilation"])
    if bias is not None:
        total = total + A.sum(dim=(2, 3)).matmul(bias)
    A = _transposed_window(engine, node, weight, A, stride, dilation)
    oy, ox = oy * stride[0] - padding[0], ox * stride[1] - padding[1]
    a, b = A.shape[2:]
    if int(oy.min()) < 0 or int(ox.min()) < 0 or int(oy.max()) + a > x.shape[2] or int(ox.max()) + b > x.shape[3]:
        A = A * _inside(oy, ox, a, b, x.shape[2], x.shape[3], A.dtype)      # (every window inside: nothing to cut)
    return A, oy, ox, total, grid.down(stride, padding)


MATRIX_BUDGET = 1 << 21
"""Largest window-to-window matrix (entries) of a transposed convolution kept as a dense matrix."""


def _transposed_conv(A, weight, stride, dilation):
    if stride == (1, 1):  # as a convolution with the flipped kernel: see backward_affine._transposed_as_conv
        # (to many channels too: 19 vs 23 ms for 1782 rows of LeNet's second layer)
        flipped = weight.flip((2, 3)).transpose(0, 1)
        full = tuple(d * (k - 1) for d, k in zip(dilation, weight.shape[2:]))
        if weight.shape[1] < 4 and A.device.type == "cpu" and torch.backends.mkldnn.enabled:
            # oneDNN's convolution to one or two channels is slow here: ATen's own (unfold + gemm) took
            # 10 vs 18 ms for 500 rows of LeNet's first layer (the margin's whole maps), 43 vs 103 ms for 1500
            torch.backends.mkldnn.set_flags(False, _fp32_precision=None)   # only the switch
            try:
                return F.conv2d(A, flipped, padding=full, dilation=dilation)
            finally:
                torch.backends.mkldnn.set_flags(True, _fp32_precision=None)
        return F.conv2d(A, flipped, padding=full, dilation=dilation)
    return F.conv_transpose2d(A, weight, stride=stride, dilation=dilation)


def _transposed_window(engine, node, weight, A, stride, dilation):
    """W^T * A on a window.  Windows are small: as one matmul with the map's dense matrix (built once per
    engine by transposing the identity) it runs several times faster than a convolution with a few
    output channels on this class of CPU (measured: 3 vs 8 ms for 1782 rows of LeNet's first layer)."""
    rows, co, a, b = A.shape
    size = co * a * b
    cache = engine.__dict__.setdefault("_window_matrices", {})
    key = (node.name, a, b, A.dtype, A.device, weight.data_ptr(), weight._version)   # weights edited in place: rebuilt
    matrix = cache.get(key)
    if matrix is None:
        out = _transposed_conv(torch.zeros((1, co, a, b), dtype=A.dtype, device=A.device), weight, stride, dilation)
        # to many channels a convolution is the faster (measured: 20 vs 51 ms, LeNet's second layer, 1782 rows)
        if weight.shape[1] >= 4 or size * out[0].numel() > MATRIX_BUDGET:
            cache[key] = False
        else:
            eye = torch.eye(size, dtype=A.dtype, device=A.device).reshape(size, co, a, b)
            image = _transposed_conv(eye, weight, stride, dilation)
            cache[key] = matrix = (image.reshape(size, -1).contiguous(), tuple(image.shape[1:]))
    if not matrix:
        return _transposed_conv(A, weight, stride, dilation)
    dense, shape = matrix
    return A.reshape(rows, size).matmul(dense).reshape((rows,) + shape)


def _remember(engine, what: str, x, compute):
    """Per-sample maps computed once per bounds object (all chunks and refinements read the same ones)."""
    key = (what, id(x))
    hit = engine.memo.get(key)
    if hit is None or hit[0] is not x:
        hit = engine.memo[key] = (x, compute())
    return hit[1]


def _bn_window(engine, values, node, A, total):
    """Through an eval-mode batch norm y = a x + c (per channel): A a on x, sum(A c) to the bias."""
    try:
        x, scale, shift = batch_norm_affine(engine._call(node, values))
    except HardenError:
        raise _NotWindowed from None
    if x.dim() != 4:
        raise _NotWindowed
    # entries of A off the map are 0 (cut after every convolution; a pool scatters to picked entries only)
    total = total + A.sum(dim=(2, 3)).matmul(shift)
    return A * scale.view(1, -1, 1, 1), total


def _relu_window(engine, values, node, A, rows, oy, ox, total, grid):
    x = values[node.all_input_nodes[0].name]
    # lower slope, upper slope and upper intercept stacked along the channels: one gather per window
    stacked = _remember(engine, "relu-window", x, lambda: torch.cat(
        _remember(engine, "relu", x, lambda: relu_relaxation(x)), dim=1))
    c = A.shape[1]
    a, b = A.shape[2:]
    params = _crop_rows(engine, "relu-window", stacked, rows, oy, ox, grid, a, b)
    low, up, icpt = params[:, :c], params[:, c:2 * c], params[:, 2 * c:]
    neg = A.clamp(max=0)
    total = total + flat_sum(neg * icpt)
    # A+ low + A- up: two products instead of a select on the sign (several times slower per element here)
    return A.clamp(min=0) * low + neg * up, total


def _pool_window(engine, values, node, A, rows, oy, ox, total, grid, relu=None):
    """Through a max pool (see :mod:`harden.bounds.backward_pooling`).  With ``relu`` (the pool's input is
    that ReLU's output and the windows do not overlap) the ReLU is relaxed here too, at the picked entries
    only: each ReLU neuron is picked by at most one window, so its coefficient is the picked share alone
    and the result is the separate passes' (the window of ReLU parameters, mostly unread, is never gathered).
    """
    x, g = _geometry(engine._call(node, values))
    if g["dilation"] != (1, 1) or g.get("extra"):
        raise _NotWindowed
    n, c, h, w = x.shape
    out = values[node.name].shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = g["kernel_size"], g["stride"], g["padding"]
    fused = relu is not None

    def maps():
        index, stable, top = _remember(engine, f"max_pool2d{sorted(g.items())}", x, lambda: _relaxation(x, g))
        # the picked entry's offset inside its window
        wy = torch.arange(out[0], device=x.device).view(1, 1, -1, 1) * sh - ph
        wx = torch.arange(out[1], device=x.device).view(1, 1, 1, -1) * sw - pw
        flat = index
        index = index.reshape(n, c, out[0], out[1])
        # stable as 0/1, and the largest upper bound where the window is unstable (0 where stable): the step
        # below is then products and sums only
        stable = stable.reshape(n, c, *out)
        parts = [stable.to(x.dtype), torch.where(stable, torch.zeros_like(top.reshape(n, c, *out)), top.reshape(n, c, *out)),
                 (index // w - wy).to(x.dtype), (index % w - wx).to(x.dtype)]
        if fused:
            z = values[relu.all_input_nodes[0].name]
            for t in _remember(engine, "relu", z, lambda: relu_relaxation(z)):
                parts.append(t.reshape(n, c, h * w).gather(2, flat).reshape(n, c, *out))
        return torch.cat(parts, 1)

    stacked = _remember(engine, f"max_pool2d-window{fused}{sorted(g.items())}", x, maps)
    a, b = A.shape[2:]
    params = _crop_rows(engine, f"max_pool2d-window{fused}", stacked, rows, oy, ox, grid, a, b)
    stable_r, top_r = params[:, :c], params[:, c:2 * c]
    neg = A.clamp(max=0)
    total = total + flat_sum(neg * top_r)                   # an unstable window's negative share: its top bound
    on_pick = A.clamp(min=0) + neg * stable_r               # the rest goes to the picked entry
    if fused:
        low, up, icpt = params[:, 4 * c:5 * c], params[:, 5 * c:6 * c], params[:, 6 * c:]
        neg = on_pick.clamp(max=0)
        total = total + flat_sum(neg * icpt)
        on_pick = on_pick.clamp(min=0) * low + neg * up
    height, width = (a - 1) * sh + kh, (b - 1) * sw + kw
    corner = (torch.arange(a, device=A.device, dtype=A.dtype).view(1, 1, -1, 1) * (sh * width)
              + torch.arange(b, device=A.device, dtype=A.dtype).view(1, 1, 1, -1) * sw)
    target = (params[:, 2 * c:3 * c] * width + params[:, 3 * c:4 * c] + corner).round().long()
    out_A = torch.zeros((A.shape[0], c, height * width), dtype=A.dtype, device=A.device)
    out_A.scatter_add_(2, target.reshape(A.shape[0], c, -1), on_pick.reshape(A.shape[0], c, -1))
    return (out_A.reshape(A.shape[0], c, height, width), oy * sh - ph, ox * sw - pw, total,
            grid.down((sh, sw), (ph, pw)))


def _relu_below(engine, chain, i, stop=frozenset()):
    """The ReLU right below the max pool ``chain[i]`` when it can be relaxed inside the pool step: the pool's
    windows do not overlap, the ReLU's output feeds nothing but the pool and the pass does not stop there."""
    if i + 1 >= len(chain) or engine.keys[chain[i + 1]] != "relu" or len(chain[i + 1].users) != 1:
        return None
    if chain[i + 1].name in stop:
        return None
    module = engine.gm.get_submodule(chain[i].target) if chain[i].op == "call_module" else None
    if module is None:
        return None
    kernel, stride = _pairs(module.kernel_size), _pairs(module.stride if module.stride is not None else module.kernel_size)
    return chain[i + 1] if all(s >= k for s, k in zip(stride, kernel)) else None


class _NotWindowed(Exception):
    pass


def conv_neuron_lower(engine, values: dict, node: fx.Node, chain: list[fx.Node], rows: torch.Tensor,
                      neuron: torch.Tensor, sign: torch.Tensor) -> torch.Tensor | None:
    """Lower bounds [R] of ``sign * node[rows, neuron]`` for a conv2d ``node`` above a window chain (or a
    batch norm right above one), or None."""
    if engine.keys[node] == "batch_norm":
        if not chain or engine.keys[chain[0]] != "conv2d":
            return None
        try:
            _, scale, shift = batch_norm_affine(engine._call(node, values))
        except HardenError:
            return None
        out = values[node.name].shape[2:] if isinstance(values.get(node.name), Interval) else None
        if out is None or len(out) != 2:
            return None
        channel = neuron // (out[0] * out[1])
        lower = conv_neuron_lower(engine, values, chain[0], chain[1:], rows, neuron, sign * scale.index_select(0, channel))
        return None if lower is None else lower + sign * shift.index_select(0, channel)
    try:
        x, p = _conv_params(engine._call(node, values))
        if p["groups"] != 1 or isinstance(p["padding"], str) or x.dim() != 4 or p.get("pre_pad") is not None:
            return None
        weight, bias = p["weight"], p["bias"]
        stride, padding = _pairs(p["stride"]), _pairs(p["padding"])
        out = values[node.name].shape[2:] if isinstance(values.get(node.name), Interval) else None
        if out is None:
            return None
        channel, place = neuron // (out[0] * out[1]), neuron % (out[0] * out[1])
        y, xpos = place // out[1], place % out[1]
        A = weight.index_select(0, channel) * sign.view(-1, 1, 1, 1)
        total = sign * bias.index_select(0, channel) if bias is not None else torch.zeros_like(sign)
        dilation = _pairs(p["dilation"])
        if dilation != (1, 1):
            return None
        oy, ox = y * stride[0] - padding[0], xpos * stride[1] - padding[1]
        A = A * _inside(oy, ox, A.shape[2], A.shape[3], x.shape[2], x.shape[3], A.dtype)
        grid = _Grid(y, xpos, stride, (-padding[0], -padding[1]), tuple(out))
        return _down_chain(engine, values, chain, node, A, rows, oy, ox, total, grid, frozenset())
    except _NotWindowed:
        return None


def _down_chain(engine, values, chain, top, A, rows, oy, ox, total, grid, stop) -> torch.Tensor:
    """Lower bounds [R]: A on the output of ``chain[0]`` (a window of it) through the chain down to the box, or
    to the interval of the first node of ``stop`` (names) that it reaches."""
    skip = None
    for i, n in enumerate(chain):
        key = engine.keys[n]
        if n.name in stop:
            return total + _window_box(engine, values[n.name], A, rows, oy, ox, grid)
        if n is skip:
            pass
        elif key == "max_pool2d":
            relu = _relu_below(engine, chain, i, stop)
            A, oy, ox, total, grid = _pool_window(engine, values, n, A, rows, oy, ox, total, grid, relu)
            skip = relu
        elif key == "relu":
            A, total = _relu_window(engine, values, n, A, rows, oy, ox, total, grid)
        elif key == "batch_norm":
            A, total = _bn_window(engine, values, n, A, total)
        else:
            A, oy, ox, total, grid = _conv_window(engine, values, n, A, oy, ox, total, grid)
        engine.rules_used.add(key)
    box = values[next(s for s in (chain[-1] if chain else top).all_input_nodes if s in engine.dependent).name]
    return total + _window_box(engine, box, A, rows, oy, ox, grid)


def _window_box(engine, iv: Interval, A, rows, oy, ox, grid) -> torch.Tensor:
    """min of sum(A * v) over v in the interval ``iv``, A on the window at (oy, ox)."""
    a, b = A.shape[2:]
    c = A.shape[1]
    ends = _crop_rows(engine, "box-window", _remember(engine, "box-window", iv, lambda: torch.cat([iv.lo, iv.hi], 1)),
                      rows, oy, ox, grid, a, b)
    return flat_sum(A.clamp(min=0) * ends[:, :c] + A.clamp(max=0) * ends[:, c:])


def map_lower(engine, values: dict, chain: list[fx.Node], A: torch.Tensor, rows: torch.Tensor,
              stop: frozenset) -> torch.Tensor | None:
    """Lower bounds [R] of sum(A * chain[0]'s output) (A [R, C, H, W]: whole maps, e.g. a dense layer's rows
    after a flatten) through the window chain, or None when the chain has an unsupported geometry.  The
    whole map is one window at corner (0, 0); the steps are the windowed ones (same relaxations as the
    dense rules; a ReLU under a non-overlapping pool is relaxed at the picks, which gathers a quarter of
    the parameters)."""
    zero = torch.zeros(A.shape[0], dtype=torch.long, device=A.device)
    grid = _Grid(zero, zero, (1, 1), (0, 0), (1, 1))
    total = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    try:
        return _down_chain(engine, values, chain, chain[0], A, rows, zero, zero, total, grid, stop)
    except _NotWindowed:
        return None
