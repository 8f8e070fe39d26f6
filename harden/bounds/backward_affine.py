"""Backward rules of affine ops: the coefficients pass through the adjoint of the op, exactly.

linear / conv: ``A W`` (a transposed convolution); batch norm and constant
scalings: per-element scales; shape ops: the inverse move; add / cat: each
interval operand gets its share, a constant operand joins the bias.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from harden.bounds import norm
from harden.bounds.backward import Back, backward_rule, flat_sum
from harden.bounds.interval import Interval
from harden.bounds.linear import CONV_SIGNATURE, _conv_module, explicit_padding, linear_parts
from harden.bounds.rules import REQUIRED, Call, concrete_arg, interval_arg, replay
from harden.errors import HardenError


# --------------------------------------------------------------------------- linear
def _linear_start(call: Call, neuron, sign, rows) -> Back | None:
    x, weight, bias = linear_parts(call)
    if x.dim() != 2:
        return None
    back = Back(call, None, rows)
    back.emit(x, weight.index_select(0, neuron) * sign.unsqueeze(1))
    if bias is not None:
        back.add_bias(bias.index_select(0, neuron) * sign)
    return back


@backward_rule("linear", start=_linear_start)
def linear(back: Back) -> None:
    """y = x W^T + b: coefficients A W on x, A b to the bias."""
    x, weight, bias = linear_parts(back.call)
    back.emit(x, back.A.matmul(weight))
    if bias is not None:
        back.add_bias(flat_sum(back.A.matmul(bias)))


# --------------------------------------------------------------------------- convolution
def _conv_params(call: Call) -> tuple[Interval, dict]:
    p = call.bind(CONV_SIGNATURE, _conv_module)
    x = interval_arg(call, p["input"], "the input")
    p["weight"] = concrete_arg(call, p["weight"], "weight")
    p["bias"] = concrete_arg(call, p["bias"], "bias")
    return x, explicit_padding(p, p["weight"])


def _as_tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _transposed_as_conv(A: torch.Tensor, weight: torch.Tensor, p: dict, conv) -> torch.Tensor | None:
    """W^T * A as a plain convolution with the flipped kernel (stride 1, groups 1 only), else None.

    oneDNN's transposed convolution to few channels (a first layer's input) is several times
    slower than the equivalent convolution on this class of CPU (measured: 56 ms vs 8 ms for
    200 rows of LeNet's first layer).
    """
    spatial = weight.dim() - 2
    stride, dilation = _as_tuple(p["stride"], spatial), _as_tuple(p["dilation"], spatial)
    padding = p["padding"]
    if isinstance(padding, str) or p["groups"] != 1 or any(s != 1 for s in stride):
        return None
    padding = _as_tuple(padding, spatial)
    full = tuple(d * (k - 1) - q for d, k, q in zip(dilation, weight.shape[2:], padding))
    if any(f < 0 for f in full):
        return None
    flipped = weight.flip(tuple(range(2, weight.dim()))).transpose(0, 1)
    return conv(A, flipped, padding=full, dilation=dilation)


_TRANSPOSED = {3: F.conv_transpose1d, 4: F.conv_transpose2d}


def _transposed(flat: torch.Tensor, weight: torch.Tensor, p: dict, x_shape: tuple) -> torch.Tensor | None:
    """W^T * A as a transposed convolution, the output padding chosen to give the input's shape; None where no
    output padding does.  Faster than ``torch.nn.grad.conv*_input`` on this class of CPU (measured, CPU time, 800
    rows: 26 vs 41 ms on a 128-channel 4x4 map, 52 vs 61 ms on a 64-channel 8x8 map, 43 vs 49 ms with stride 2)."""
    fn = _TRANSPOSED.get(flat.dim())
    if fn is None or isinstance(p["padding"], str):
        return None
    spatial = flat.dim() - 2
    stride, padding = _as_tuple(p["stride"], spatial), _as_tuple(p["padding"], spatial)
    dilation = _as_tuple(p["dilation"], spatial)
    extra = tuple(size - ((o - 1) * s - 2 * q + d * (k - 1) + 1) for size, o, s, q, d, k
                  in zip(x_shape[2:], flat.shape[2:], stride, padding, dilation, weight.shape[2:]))
    if any(e < 0 or e >= max(s, d) for e, s, d in zip(extra, stride, dilation)):
        return None
    return fn(flat, weight, stride=stride, padding=padding, output_padding=extra, groups=p["groups"], dilation=dilation)


def _conv_backward(back: Back, grad_input, conv) -> None:
    x, p = _conv_params(back.call)
    A = back.A
    out_shape = A.shape[1:]
    flat = A.reshape((-1,) + tuple(out_shape))
    x_shape = (flat.shape[0],) + tuple(x.shape[1:])
    weight = p["weight"]
    pre_pad = p.get("pre_pad")
    if pre_pad is not None:
        # reflect / replicate / circular: convolve the padded input without padding, then pass the
        # coefficients back through the padding (a linear copy of entries) by its adjoint.
        pads, mode = pre_pad
        rows = flat.shape[0]
        with torch.enable_grad():
            probe = torch.zeros(x_shape, dtype=flat.dtype, device=flat.device, requires_grad=True)
            padded = F.pad(probe, pads, mode=mode)
            on_padded = grad_input(tuple(padded.shape), weight, flat, stride=p["stride"], padding=0,
                                   dilation=p["dilation"], groups=p["groups"])
            (coefficients,) = torch.autograd.grad(padded, probe, on_padded)
        back.emit(x, coefficients)
        if p["bias"] is not None:
            back.add_bias(A.reshape(rows, A.shape[1], -1).sum(dim=2).matmul(p["bias"]))
        return
    coefficients = _as_matrix(back, x, flat, weight, p, grad_input)
    if coefficients is None and weight.shape[1] < 4:
        coefficients = _transposed_as_conv(flat, weight, p, conv)
    if coefficients is None or tuple(coefficients.shape) != x_shape:
        coefficients = _transposed(flat, weight, p, x_shape)
    if coefficients is None or tuple(coefficients.shape) != x_shape:
        coefficients = grad_input(x_shape, weight, flat, stride=p["stride"], padding=p["padding"],
                                  dilation=p["dilation"], groups=p["groups"])
    back.emit(x, coefficients)
    if p["bias"] is not None:
        per_channel = A.reshape(A.shape[0], A.shape[1], -1).sum(dim=2)
        back.add_bias(per_channel.matmul(p["bias"]))


MATRIX_ENTRIES = 1 << 22
"""Largest dense matrix (entries) of a convolution on a small map that :func:`_as_matrix` builds."""


def _as_matrix(back: Back, x: Interval, flat: torch.Tensor, weight: torch.Tensor, p: dict, grad_input):
    """W^T * A as one product with the convolution's dense matrix, where the maps are so small that the matrix
    has fewer entries than the convolution has multiply-adds per row (a ResNet's last stages: 2x2 and 1x1 maps,
    where most kernel taps meet padding): measured 23 vs 54 ms for 512 rows of a 512-channel 1x1 map."""
    out_size, in_size = flat[0].numel(), x.lo[0].numel()
    taps = weight[0, 0].numel()
    if out_size * in_size > min(MATRIX_ENTRIES, out_size * weight.shape[1] * taps // 2):
        return None

    def build():
        eye = torch.eye(out_size, dtype=flat.dtype, device=flat.device).reshape((out_size,) + tuple(flat.shape[1:]))
        image = grad_input((out_size,) + tuple(x.shape[1:]), weight, eye, stride=p["stride"], padding=p["padding"],
                           dilation=p["dilation"], groups=p["groups"])
        return image.reshape(out_size, in_size)

    matrix = back.remember(f"conv-matrix-{weight.data_ptr()}-{weight._version}", x, build)
    return flat.reshape(flat.shape[0], out_size).matmul(matrix).reshape((flat.shape[0],) + tuple(x.shape[1:]))


def _index_windows(call: Call, x: Interval, p: dict) -> torch.Tensor:
    """[C_in k k, L]: the flat input position (1-based, 0 = padding) every kernel entry meets at every output
    position.  Unfolding a map of positions answers it for any stride, padding and dilation."""
    positions = torch.arange(1, x.lo[0].numel() + 1, device=x.device, dtype=torch.float64).reshape((1,) + tuple(x.shape[1:]))
    cols = F.unfold(positions, p["weight"].shape[2:], dilation=p["dilation"], padding=p["padding"], stride=p["stride"])
    return cols[0].round().long()


def _conv2d_start(call: Call, neuron, sign, rows) -> Back | None:
    """sign * conv output[neuron] written as weights on the input window (no transposed convolution of a one-hot)."""
    x, p = _conv_params(call)
    if p["groups"] != 1 or x.dim() != 4 or p.get("pre_pad") is not None:
        return None
    weight = p["weight"]
    cols = _index_windows(call, x, p)                                # [C k k, L]
    positions = cols.shape[1]
    channel, place = neuron // positions, neuron % positions
    targets = cols.index_select(1, place).t()                        # [R, C k k]
    values = weight.index_select(0, channel).reshape(len(neuron), -1) * sign.unsqueeze(1)
    size = x.lo[0].numel()
    coefficients = torch.zeros(len(neuron), size + 1, device=values.device, dtype=values.dtype)
    coefficients.scatter_add_(1, targets, values)
    back = Back(call, None, rows)
    back.emit(x, coefficients[:, 1:].reshape((len(neuron),) + tuple(x.shape[1:])))
    if p["bias"] is not None:
        back.add_bias(p["bias"].index_select(0, channel) * sign)
    return back


@backward_rule("conv2d", start=_conv2d_start)
def conv2d(back: Back) -> None:
    """y = W * x + b: coefficients W^T * A (a transposed convolution) on x, sum(A) b to the bias."""
    _conv_backward(back, torch.nn.grad.conv2d_input, F.conv2d)


@backward_rule("conv1d")
def conv1d(back: Back) -> None:
    """y = W * x + b (1-d): coefficients W^T * A on x."""
    _conv_backward(back, torch.nn.grad.conv1d_input, F.conv1d)


# --------------------------------------------------------------------------- batch norm
def batch_norm_affine(call: Call) -> tuple[Interval, torch.Tensor, torch.Tensor]:
    """(input, a, c) of an eval-mode batch norm y = a x + c, a and c per channel."""
    p = call.bind(norm._signature(call), norm._module_params)
    x = interval_arg(call, p["input"], "the input")
    if p.get("training"):
        raise call.fail("batch norm with batch statistics cannot be bounded per sample; put the model in eval mode")
    if call.target is norm.aten._native_batch_norm_legit_no_training.default:
        raise call.fail("the tuple-valued batch norm has no backward rule")
    scale = torch.rsqrt(concrete_arg(call, p["running_var"], "running_var") + float(p["eps"]))
    weight, bias = concrete_arg(call, p["weight"], "weight"), concrete_arg(call, p["bias"], "bias")
    if weight is not None:
        scale = scale * weight
    shift = -concrete_arg(call, p["running_mean"], "running_mean") * scale
    if bias is not None:
        shift = shift + bias
    return x, scale, shift


@backward_rule("batch_norm")
def batch_norm(back: Back) -> None:
    """y = a x + c per channel: coefficients A a on x, sum(A c) to the bias."""
    x, scale, shift = batch_norm_affine(back.call)
    view = (1, -1) + (1,) * (x.dim() - 2)
    back.emit(x, back.A * scale.reshape(view))
    back.add_bias(flat_sum(back.A * shift.reshape(view)))


# --------------------------------------------------------------------------- linear maps without a closed adjoint here
def _vjp(back: Back, x: Interval, fn) -> None:
    """Coefficients through a linear, bias-free, per-sample map ``fn`` by autograd: its adjoint applied to A."""
    rows = back.A.shape[0]
    with torch.enable_grad():
        probe = torch.zeros((rows,) + tuple(x.shape[1:]), dtype=back.A.dtype, device=back.A.device, requires_grad=True)
        out = fn(probe)
        if out.shape != back.A.shape:
            raise back.call.fail(f"the op mixes samples (output {tuple(out.shape)} for {rows} rows); "
                                 "no backward rule")
        (coefficients,) = torch.autograd.grad(out, probe, back.A)
    back.emit(x, coefficients)


def _only_interval(call: Call) -> Interval:
    found = [a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, Interval)]
    if len(found) != 1:
        raise call.fail("expected exactly one input-dependent argument")
    return found[0]


@backward_rule("avg_pool2d")
def avg_pool2d(back: Back) -> None:
    """average pooling is linear: its adjoint (by autograd) applied to A."""
    x = _only_interval(back.call)
    _vjp(back, x, replay(back.call, x))


@backward_rule("adaptive_avg_pool2d")
def adaptive_avg_pool2d(back: Back) -> None:
    """adaptive average pooling is linear: its adjoint applied to A."""
    avg_pool2d(back)


@backward_rule("mean")
def mean(back: Back) -> None:
    """mean over non-batch dims is linear: its adjoint applied to A."""
    avg_pool2d(back)


@backward_rule("getitem")
def getitem(back: Back) -> None:
    """x[idx] selects entries (idx leaves the batch dim whole): the adjoint scatters A back; an item of a
    tuple of values (chunk, split, unbind) passes A to that item, whose node's rule takes it from there."""
    obj, index = back.call.args[0], back.call.args[1]
    if isinstance(obj, (tuple, list)):
        if not isinstance(index, int) or not isinstance(obj[index], Interval):
            raise back.call.fail("only an input-dependent item of a tuple, by a whole-number index, has a rule")
        back.emit(obj[index], back.A)
        return
    if not isinstance(obj, Interval):
        raise back.call.fail("an item of a tuple of values has no backward rule")
    avg_pool2d(back)


def _pieces_back(back: Back) -> None:
    """A tuple of pieces of one input (``back.A`` holds coefficients by piece index): their adjoint, by autograd
    on the op itself, pieces without coefficients counting as 0."""
    x = interval_arg(back.call, back.call.first_input, "the input")
    given = back.A if isinstance(back.A, dict) else {}
    rows = next(iter(given.values())).shape[0] if given else 0
    fn = replay(back.call, x)
    with torch.enable_grad():
        probe = torch.zeros((rows,) + tuple(x.shape[1:]), dtype=x.lo.dtype, device=x.lo.device, requires_grad=True)
        pieces = fn(probe)
        if any(p.shape[0] != rows for p in pieces):
            raise back.call.fail("the op splits along the batch dim; no backward rule")
        outputs = [p for i, p in enumerate(pieces) if i in given]
        (coefficients,) = torch.autograd.grad(outputs, probe, [given[i] for i in range(len(pieces)) if i in given])
    back.emit(x, coefficients)


@backward_rule("chunk")
def chunk(back: Back) -> None:
    """chunk: each piece's coefficients go back to its slice of the input."""
    _pieces_back(back)


@backward_rule("split")
def split(back: Back) -> None:
    """split: each piece's coefficients go back to its slice of the input."""
    _pieces_back(back)


@backward_rule("unbind")
def unbind(back: Back) -> None:
    """unbind: each slice's coefficients go back to its index of the input."""
    _pieces_back(back)


@backward_rule("slice")
def slice_(back: Back) -> None:
    """aten.slice selects entries: the adjoint scatters A back."""
    avg_pool2d(back)


@backward_rule("select")
def select(back: Back) -> None:
    """aten.select selects entries: the adjoint scatters A back."""
    avg_pool2d(back)


# --------------------------------------------------------------------------- shape moves
@backward_rule("flatten")
def flatten(back: Back) -> None:
    """flatten (batch dim kept): A reshaped to the input's shape."""
    x = interval_arg(back.call, back.call.first_input, "the input")
    _reshape_back(back, x)


def _reshape_back(back: Back, x: Interval) -> None:
    # Keeping the batch dim, a reshape moves each sample's block onto the same sample's block:
    # reshaping A row by row inverts it.
    if back.output is None or back.output.shape[0] != x.shape[0]:
        raise back.call.fail("the reshape mixes samples; no backward rule")
    back.emit(x, back.A.reshape((back.A.shape[0],) + tuple(x.shape[1:])))


@backward_rule("reshape")
def reshape(back: Back) -> None:
    """reshape / view keeping the batch dim: A reshaped to the input's shape."""
    x = interval_arg(back.call, back.call.first_input, "the input")
    _reshape_back(back, x)


@backward_rule("permute")
def permute(back: Back) -> None:
    """permute keeping the batch dim first: A permuted back (by autograd)."""
    x = interval_arg(back.call, back.call.first_input, "the input")
    _vjp(back, x, replay(back.call, x))


@backward_rule("transpose")
def transpose(back: Back) -> None:
    """transpose of non-batch dims: A transposed back."""
    permute(back)


@backward_rule("unsqueeze")
def unsqueeze(back: Back) -> None:
    """unsqueeze of a non-batch dim: A moved back (by autograd)."""
    permute(back)


@backward_rule("squeeze")
def squeeze(back: Back) -> None:
    """squeeze of non-batch dims: A moved back (by autograd)."""
    permute(back)


@backward_rule("unflatten")
def unflatten(back: Back) -> None:
    """unflatten of a non-batch dim: A moved back (by autograd)."""
    permute(back)


@backward_rule("matmul")
def matmul(back: Back) -> None:
    """x @ W or W @ x for a constant W is linear in x: its adjoint applied to A (a product of two input-dependent
    values has no rule: its interval stands in)."""
    x = _only_interval(back.call)
    _vjp(back, x, replay(back.call, x))


@backward_rule("identity")
def identity(back: Back) -> None:
    """identity / clone / eval-mode dropout: A unchanged."""
    call = back.call
    x = interval_arg(call, call.first_input, "the input")
    module = call.module
    if module is not None and getattr(module, "training", False) and float(getattr(module, "p", 0.0)) > 0:
        raise call.fail("dropout in training mode has no backward rule; put the model in eval mode")
    if module is None and call.kwargs.get("training", len(call.args) > 2 and call.args[2]) is True:
        raise call.fail("dropout in training mode has no backward rule")
    back.emit(x, back.A)


# --------------------------------------------------------------------------- arithmetic with constants
_BINARY = (("input", REQUIRED), ("other", REQUIRED), ("alpha", 1))


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Reduce coefficients on a broadcast output back to an operand of ``shape`` (rows kept)."""
    target = (t.shape[0],) + tuple(shape[1:]) if len(shape) == t.dim() else None
    if target is None:
        raise HardenError("bounds: an input-dependent operand without the batch dimension")
    return t.sum_to_size(target) if tuple(t.shape) != target else t


def _term(back: Back, value, factor) -> None:
    """``factor * value`` is a term of the output: interval operands get A * factor, constants join the bias."""
    A = back.A
    if isinstance(value, Interval):
        back.emit(value, _sum_to(A * factor, value.shape))
    elif isinstance(value, torch.Tensor):
        back.add_bias(flat_sum(A * (factor * value)))
    else:
        back.add_bias(flat_sum(A) * (factor * value))


def _alpha(back: Back, p: dict):
    alpha = concrete_arg(back.call, p["alpha"], "alpha")
    return 1 if alpha is None else alpha


@backward_rule("add")
def add(back: Back) -> None:
    """a + alpha b: A on a, alpha A on b (constants to the bias)."""
    p = back.call.bind(_BINARY)
    _term(back, p["input"], 1.0)
    _term(back, p["other"], _alpha(back, p))


@backward_rule("sub")
def sub(back: Back) -> None:
    """a - alpha b: A on a, -alpha A on b."""
    p = back.call.bind(_BINARY)
    _term(back, p["input"], 1.0)
    _term(back, p["other"], -_alpha(back, p))


@backward_rule("rsub")
def rsub(back: Back) -> None:
    """rsub(a, b, alpha) = b - alpha a."""
    p = back.call.bind(_BINARY)
    _term(back, p["other"], 1.0)
    _term(back, p["input"], -_alpha(back, p))


@backward_rule("neg")
def neg(back: Back) -> None:
    """-x: -A on x."""
    _term(back, back.call.bind((("input", REQUIRED),))["input"], -1.0)


def _constant_factor(call: Call, value):
    if isinstance(value, Interval):
        raise call.fail("a product of two input-dependent values has no backward rule")
    return value


@backward_rule("mul")
def mul(back: Back) -> None:
    """c x for a constant c: A c on x."""
    p = back.call.bind((("input", REQUIRED), ("other", REQUIRED)))
    a, b = p["input"], p["other"]
    if isinstance(a, Interval):
        _term(back, a, _constant_factor(back.call, b))
    else:
        _term(back, b, _constant_factor(back.call, a))


@backward_rule("div")
def div(back: Back) -> None:
    """x / c for a constant c (no rounding): A / c on x."""
    p = back.call.bind((("input", REQUIRED), ("other", REQUIRED), ("rounding_mode", None)))
    if p["rounding_mode"] is not None or not isinstance(p["input"], Interval):
        raise back.call.fail("only division of an input-dependent value by a constant has a backward rule")
    c = _constant_factor(back.call, p["other"])
    _term(back, p["input"], 1.0 / c if isinstance(c, numbers.Real) else torch.reciprocal(c))


@backward_rule("cat")
def cat(back: Back) -> None:
    """cat along a non-batch dim: each operand gets its slice of A; constant parts join the bias."""
    p = back.call.bind((("tensors", REQUIRED), ("dim", 0)))
    parts = p["tensors"]
    dim = p["dim"]
    ndim = back.A.dim()
    dim = dim + ndim if dim < 0 else dim
    if dim == 0:
        raise back.call.fail("cat along the batch dim has no backward rule")
    start = 0
    for part in parts:
        width = part.shape[dim]
        piece = back.A.narrow(dim, start, width)
        start += width
        if isinstance(part, Interval):
            back.emit(part, piece)
        else:
            back.add_bias(flat_sum(piece * part))
