"""A menu of small layers, each in several spellings, and a builder of random classifiers from it.

Shared by the interval-bound property tests.  Every entry names the canonical
op key it exercises; ``SPELLINGS`` lists them all so a sweep can hit each one.
Shapes are tracked as ("img", C, H, W) or ("vec", D).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """forward(x) = fn(self, x); submodules, parameters and buffers are registered so fx sees them."""

    def __init__(self, fn, **members):
        super().__init__()
        self.fn = fn
        for name, value in members.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def forward(self, x):
        return self.fn(self, x)


@dataclass(frozen=True)
class Spelling:
    name: str               # "<key>/<how>"
    keys: tuple[str, ...]   # canonical keys this spelling exercises
    stage: str              # "img", "vec", "img->vec" (shape of the input it accepts, and transition)
    build: Callable         # (shape, rng) -> (nn.Module, new shape)

    def __repr__(self) -> str:
        return self.name


SPELLINGS: list[Spelling] = []


def spelling(name: str, stage: str, *keys: str):
    def decorate(build):
        SPELLINGS.append(Spelling(name, keys or (name.split("/")[0],), stage, build))
        return build

    return decorate


def _param(*shape, rng: random.Random, scale=0.5) -> nn.Parameter:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return nn.Parameter(torch.randn(*shape, generator=g) * scale)


def _tensor(*shape, rng: random.Random) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(*shape, generator=g)


def _bn_stats(c, rng):
    return dict(rm=_tensor(c, rng=rng) * 0.3, rv=_tensor(c, rng=rng).abs() + 0.5,
                w=_param(c, rng=rng, scale=1.0), b=_param(c, rng=rng, scale=0.3))


def _randomise_bn(bn: nn.Module, rng) -> nn.Module:
    stats = _bn_stats(bn.num_features, rng)
    with torch.no_grad():
        bn.running_mean.copy_(stats["rm"])
        bn.running_var.copy_(stats["rv"])
        bn.weight.copy_(stats["w"])
        bn.bias.copy_(stats["b"])
    return bn


# ---------------------------------------------------------------- convolution / linear
@spelling("conv2d/module", "img")
def _(s, rng):
    _, c, h, w = s
    out, k = rng.randint(1, 4), rng.choice([1, 2, 3])
    pad = rng.choice([0, 1]) if k > 1 else 0
    stride = rng.choice([1, 2])
    mode = rng.choice(["zeros", "reflect"]) if pad and min(h, w) > pad else "zeros"
    if min(h, w) + 2 * pad < k:
        k, pad = 1, 0
    conv = nn.Conv2d(c, out, k, stride=stride, padding=pad, padding_mode=mode)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return Block(lambda m, x: m.conv(x), conv=conv), ("img", out, ho, wo)


@spelling("conv2d/functional", "img")
def _(s, rng):
    _, c, h, w = s
    out = rng.randint(1, 4)
    groups = c if c > 1 and rng.random() < 0.3 else 1
    out = out * groups if groups > 1 else out
    return Block(lambda m, x: F.conv2d(x, m.weight, m.bias, stride=1, padding=1, groups=m.groups),
                 weight=_param(out, c // groups, 3, 3, rng=rng), bias=_param(out, rng=rng), groups=groups), \
        ("img", out, h, w)


@spelling("conv2d/torch-positional", "img")
def _(s, rng):
    _, c, h, w = s
    out = rng.randint(1, 3)
    return Block(lambda m, x: torch.conv2d(x, m.weight, None, 1, 0), weight=_param(out, c, 1, 1, rng=rng)), \
        ("img", out, h, w)


@spelling("conv2d/padding-same", "img")
def _(s, rng):
    # "same" with an odd and an even kernel (torch pads the extra entry at the end), dilation, and "valid"
    _, c, h, w = s
    out = rng.randint(1, 3)
    convs = nn.Sequential(nn.Conv2d(c, out, (3, 2), padding="same"), nn.Conv2d(out, out, 3, padding="same", dilation=2),
                          nn.Conv2d(out, out, 2, padding="same"), nn.Conv2d(out, out, 1, padding="valid"))
    return Block(lambda m, x: m.convs(x), convs=convs), ("img", out, h, w)


def _conv1d_block(functional: bool, s, rng):
    _, c, h, w = s
    out = rng.randint(1, 3)
    if functional:
        fn = lambda m, x: F.conv1d(x.reshape(x.shape[0], m.c, -1), m.weight, m.bias).view(x.size(0), m.out, m.h, m.w)
        members = dict(weight=_param(out, c, 1, rng=rng), bias=_param(out, rng=rng))
    else:
        fn = lambda m, x: m.conv(torch.reshape(x, (-1, m.c, m.h * m.w))).reshape(-1, m.out, m.h, m.w)
        members = dict(conv=nn.Conv1d(c, out, 1))
    return Block(fn, c=c, out=out, h=h, w=w, **members), ("img", out, h, w)


@spelling("conv1d/module", "img", "conv1d", "reshape")
def _(s, rng):
    return _conv1d_block(False, s, rng)


@spelling("conv1d/functional", "img", "conv1d", "reshape", "getattr", "size")
def _(s, rng):
    return _conv1d_block(True, s, rng)


@spelling("linear/module", "vec")
def _(s, rng):
    out = rng.randint(2, 6)
    return Block(lambda m, x: m.fc(x), fc=nn.Linear(s[1], out)), ("vec", out)


@spelling("linear/functional", "vec")
def _(s, rng):
    out = rng.randint(2, 6)
    bias = _param(out, rng=rng) if rng.random() < 0.7 else None
    if bias is None:
        return Block(lambda m, x: F.linear(x, m.weight), weight=_param(out, s[1], rng=rng)), ("vec", out)
    return Block(lambda m, x: F.linear(x, m.weight, bias=m.bias), weight=_param(out, s[1], rng=rng), bias=bias), \
        ("vec", out)


# ---------------------------------------------------------------- batch norm
@spelling("batch_norm/module2d", "img")
def _(s, rng):
    return Block(lambda m, x: m.bn(x), bn=_randomise_bn(nn.BatchNorm2d(s[1]), rng)), s


@spelling("batch_norm/functional", "img")
def _(s, rng):
    st = _bn_stats(s[1], rng)
    return Block(lambda m, x: F.batch_norm(x, m.rm, m.rv, m.w, m.b, False, 0.1, 1e-3), **st), s


@spelling("batch_norm/module1d", "vec")
def _(s, rng):
    return Block(lambda m, x: m.bn(x), bn=_randomise_bn(nn.BatchNorm1d(s[1]), rng)), s


@spelling("batch_norm/functional-kw", "vec")
def _(s, rng):
    st = _bn_stats(s[1], rng)
    return Block(lambda m, x: F.batch_norm(x, m.rm, m.rv, weight=m.w, bias=None, eps=0.01), **st), s


# ---------------------------------------------------------------- activations (any stage)
def _activation(name, fn, *keys, **members):
    for stage in ("img", "vec"):
        spelling(f"{name}[{stage}]", stage, *(keys or (name.split("/")[0],)))(
            lambda s, rng, fn=fn: (Block(fn, **{k: (v() if callable(v) else v) for k, v in members.items()}), s))


_activation("relu/module", lambda m, x: m.act(x), act=lambda: nn.ReLU())
_activation("relu/module-inplace", lambda m, x: m.act(x), act=lambda: nn.ReLU(inplace=True))
_activation("relu/functional", lambda m, x: F.relu(x))
_activation("relu/functional-inplace", lambda m, x: F.relu(x * 1.0, inplace=True), "relu", "mul")
_activation("relu/torch", lambda m, x: torch.relu(x))
_activation("relu/method", lambda m, x: x.relu())
_activation("relu6/module", lambda m, x: m.act(x), act=lambda: nn.ReLU6())
_activation("relu6/functional", lambda m, x: F.relu6(x * 4.0), "relu6", "mul")
_activation("relu6/hardtanh-module", lambda m, x: m.act(x * 4.0), "relu6", "mul", act=lambda: nn.Hardtanh(0.0, 6.0))
_activation("relu6/hardtanh-functional", lambda m, x: F.hardtanh(x, 0.0, 6.0))
_activation("hardtanh/module", lambda m, x: m.act(x), act=lambda: nn.Hardtanh(-0.5, 0.8))
_activation("hardtanh/functional", lambda m, x: F.hardtanh(x))
_activation("hardtanh/functional-kw", lambda m, x: F.hardtanh(x, min_val=-2.0, max_val=0.3))
_activation("leaky_relu/module", lambda m, x: m.act(x), act=lambda: nn.LeakyReLU(0.1))
_activation("leaky_relu/functional", lambda m, x: F.leaky_relu(x))
_activation("leaky_relu/negative-slope", lambda m, x: F.leaky_relu(x, -0.3))
_activation("leaky_relu/module-negative", lambda m, x: m.act(x), act=lambda: nn.LeakyReLU(-0.5))
_activation("sigmoid/module", lambda m, x: m.act(x), act=lambda: nn.Sigmoid())
_activation("sigmoid/torch", lambda m, x: torch.sigmoid(x))
_activation("sigmoid/method", lambda m, x: x.sigmoid())
_activation("tanh/module", lambda m, x: m.act(x), act=lambda: nn.Tanh())
_activation("tanh/torch", lambda m, x: torch.tanh(x))
_activation("tanh/method", lambda m, x: x.tanh())
# scaled so the boxes straddle the valley of the non-monotone ones
_activation("silu/module", lambda m, x: m.act(x * 3.0 - 1.5), "silu", "mul", "sub", act=lambda: nn.SiLU())
_activation("silu/functional", lambda m, x: F.silu(x * 3.0 - 1.5), "silu", "mul", "sub")
_activation("gelu/module-tanh", lambda m, x: m.act(x * 3.0 - 1.5), "gelu", "mul", "sub",
            act=lambda: nn.GELU(approximate="tanh"))
_activation("gelu/functional", lambda m, x: F.gelu(x * 3.0 - 1.5), "gelu", "mul", "sub")
_activation("hardswish/module", lambda m, x: m.act(x * 4.0 - 2.0), "hardswish", "mul", "sub",
            act=lambda: nn.Hardswish())
_activation("hardswish/functional", lambda m, x: F.hardswish(x * 4.0 - 2.0), "hardswish", "mul", "sub")
_activation("mish/module", lambda m, x: m.act(x * 3.0 - 1.5), "mish", "mul", "sub", act=lambda: nn.Mish())
_activation("elu/module", lambda m, x: m.act(x), act=lambda: nn.ELU(0.5))
_activation("elu/functional", lambda m, x: F.elu(x))
_activation("hardsigmoid/module", lambda m, x: m.act(x * 8.0 - 4.0), "hardsigmoid", "mul", "sub",
            act=lambda: nn.Hardsigmoid())
_activation("hardsigmoid/functional", lambda m, x: F.hardsigmoid(x * 8.0 - 4.0), "hardsigmoid", "mul", "sub")
_activation("floordiv/operator", lambda m, x: (x * 4.0) // 1.5, "floordiv", "mul")
_activation("unsqueeze/squeeze", lambda m, x: torch.squeeze(x.unsqueeze(1), 1), "unsqueeze", "squeeze")
_activation("softplus/module", lambda m, x: m.act(x), act=lambda: nn.Softplus(beta=2.0, threshold=1.0))
_activation("softplus/functional", lambda m, x: F.softplus(x))
_activation("identity/dropout-module", lambda m, x: m.drop(x), act=None, drop=lambda: nn.Dropout(0.3))
_activation("identity/identity-module", lambda m, x: m.ident(x), ident=lambda: nn.Identity())
_activation("identity/dropout-functional", lambda m, x: F.dropout(x, 0.3, training=False))
_activation("identity/contiguous", lambda m, x: x.contiguous())
_activation("identity/clone", lambda m, x: x.clone())
_activation("neg/operator", lambda m, x: -x)
_activation("neg/torch", lambda m, x: torch.neg(x))
_activation("neg/method", lambda m, x: x.neg())
_activation("mul/scalar", lambda m, x: x * 0.5)
_activation("mul/scalar-left", lambda m, x: -2.0 * x)
_activation("mul/torch", lambda m, x: torch.mul(x, -1.5))
_activation("mul/method", lambda m, x: x.mul(0.7))
_activation("mul/interval-interval", lambda m, x: x * torch.sigmoid(x), "mul", "sigmoid")
_activation("mul/interval-interval-signed", lambda m, x: x * torch.tanh(x * 2.0 - 0.5), "mul", "tanh", "sub")
_activation("div/scalar", lambda m, x: x / -2.0)
_activation("div/method", lambda m, x: x.div(3.0))
_activation("div/torch", lambda m, x: torch.div(x, 0.25))
_activation("div/by-interval", lambda m, x: x / (1.0 + torch.sigmoid(x)), "div", "add", "sigmoid")
_activation("div/constant-by-interval", lambda m, x: 1.0 / (2.0 + torch.tanh(x)), "div", "add", "tanh")
_activation("div/floor", lambda m, x: torch.div(x * 3.0, 2.0, rounding_mode="floor"), "div", "mul")
_activation("reciprocal/torch", lambda m, x: torch.reciprocal(torch.sigmoid(x)), "reciprocal", "sigmoid")
_activation("reciprocal/method", lambda m, x: (x.tanh() - 1.5).reciprocal(), "reciprocal", "tanh", "sub")
_activation("rsub/torch", lambda m, x: torch.rsub(x, 1.0, alpha=0.5))
_activation("add/scalar", lambda m, x: x + 0.3)
_activation("add/scalar-left", lambda m, x: 1.0 + x)
_activation("add/self", lambda m, x: x + x.sigmoid(), "add", "sigmoid")
_activation("add/torch-alpha", lambda m, x: torch.add(x, torch.tanh(x), alpha=-0.5), "add", "tanh")
_activation("add/method", lambda m, x: x.add(torch.relu(x)), "add", "relu")
_activation("sub/operator", lambda m, x: x - torch.relu(x), "sub", "relu")
_activation("sub/scalar-left", lambda m, x: 0.5 - x)
_activation("sub/torch-alpha", lambda m, x: torch.sub(x, x.tanh(), alpha=2.0), "sub", "tanh")
_activation("sub/method", lambda m, x: x.sub(0.25))


@spelling("mul/tensor", "img")
def _(s, rng):
    return Block(lambda m, x: x * m.c, c=_tensor(1, s[1], 1, 1, rng=rng)), s


@spelling("mul/tensor-vec", "vec", "mul")
def _(s, rng):
    return Block(lambda m, x: torch.mul(m.c, x), c=_tensor(s[1], rng=rng)), s


@spelling("div/tensor", "img")
def _(s, rng):
    return Block(lambda m, x: x / m.c, c=_tensor(1, s[1], 1, 1, rng=rng).sign() * (0.5 + _tensor(1, s[1], 1, 1, rng=rng).abs())), s


@spelling("add/residual-conv", "img", "add", "conv2d")
def _(s, rng):
    c = s[1]
    return Block(lambda m, x: x + m.conv(x), conv=nn.Conv2d(c, c, 3, padding=1)), s


@spelling("sub/residual-linear", "vec", "sub", "linear")
def _(s, rng):
    return Block(lambda m, x: m.fc(x) - x, fc=nn.Linear(s[1], s[1])), s


# ---------------------------------------------------------------- softmax
_activation("softmax/functional", lambda m, x: F.softmax(x * 3.0, dim=1), "softmax", "mul")
_activation("softmax/torch", lambda m, x: torch.softmax(x, 1))
_activation("softmax/method", lambda m, x: x.softmax(-1))
_activation("softmax/module", lambda m, x: m.sm(x), sm=lambda: nn.Softmax(dim=1))
_activation("log_softmax/functional", lambda m, x: F.log_softmax(x, 1))
_activation("log_softmax/torch", lambda m, x: torch.log_softmax(x, dim=1))
_activation("log_softmax/module", lambda m, x: m.sm(x), sm=lambda: nn.LogSoftmax(1))


# ---------------------------------------------------------------- pooling
@spelling("max_pool2d/module", "img")
def _(s, rng):
    _, c, h, w = s
    if min(h, w) < 2:
        return Block(lambda m, x: m.pool(x), pool=nn.MaxPool2d(1)), s
    return Block(lambda m, x: m.pool(x), pool=nn.MaxPool2d(2)), ("img", c, h // 2, w // 2)


@spelling("max_pool2d/functional", "img")
def _(s, rng):
    _, c, h, w = s
    return Block(lambda m, x: F.max_pool2d(x, 2, 1, 1)), ("img", c, h + 1, w + 1)


@spelling("max_pool2d/functional-ceil", "img")
def _(s, rng):
    _, c, h, w = s
    return Block(lambda m, x: F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)), \
        ("img", c, -(-(h + 2 - 3) // 2) + 1, -(-(w + 2 - 3) // 2) + 1)


@spelling("max_pool2d/torch", "img")
def _(s, rng):
    return Block(lambda m, x: torch.max_pool2d(x, 1)), s


@spelling("avg_pool2d/module", "img")
def _(s, rng):
    _, c, h, w = s
    if min(h, w) < 2:
        return Block(lambda m, x: m.pool(x), pool=nn.AvgPool2d(1)), s
    return Block(lambda m, x: m.pool(x), pool=nn.AvgPool2d(2, ceil_mode=True)), ("img", c, -(-h // 2), -(-w // 2))


@spelling("avg_pool2d/functional", "img")
def _(s, rng):
    return Block(lambda m, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)), s


@spelling("adaptive_avg_pool2d/module", "img")
def _(s, rng):
    return Block(lambda m, x: m.pool(x), pool=nn.AdaptiveAvgPool2d(2)), ("img", s[1], 2, 2)


@spelling("adaptive_avg_pool2d/functional", "img")
def _(s, rng):
    return Block(lambda m, x: F.adaptive_avg_pool2d(x, (2, 1))), ("img", s[1], 2, 1)


# ---------------------------------------------------------------- shapes
@spelling("cat/torch", "img", "cat", "neg")
def _(s, rng):
    return Block(lambda m, x: torch.cat([x, -x], 1)), ("img", 2 * s[1], s[2], s[3])


@spelling("cat/concat", "vec", "cat", "sigmoid")
def _(s, rng):
    return Block(lambda m, x: torch.concat((x, torch.sigmoid(x[:, :2])), dim=1)), ("vec", s[1] + min(2, s[1]))


@spelling("cat/three", "vec", "cat", "mul", "relu")
def _(s, rng):
    return Block(lambda m, x: torch.cat((x * 0.5, x, torch.relu(x)), dim=-1)), ("vec", 3 * s[1])


@spelling("getitem/channels", "img")
def _(s, rng):
    k = max(1, s[1] // 2)
    return Block(lambda m, x: x[:, : m.k], k=k), ("img", k, s[2], s[3])


@spelling("getitem/rows", "img")
def _(s, rng):
    if s[2] < 2:
        return Block(lambda m, x: x[:, :, :, :]), s
    return Block(lambda m, x: x[:, :, 1:, :]), ("img", s[1], s[2] - 1, s[3])


@spelling("getitem/select", "img->vec", "getitem")
def _(s, rng):
    return Block(lambda m, x: x[:, 0, 0]), ("vec", s[3])


@spelling("getitem/step", "vec")
def _(s, rng):
    return Block(lambda m, x: x[..., ::2]), ("vec", (s[1] + 1) // 2)


@spelling("permute/method", "img")
def _(s, rng):
    return Block(lambda m, x: x.permute(0, 1, 3, 2)), ("img", s[1], s[3], s[2])


@spelling("permute/torch", "img")
def _(s, rng):
    return Block(lambda m, x: torch.permute(x, (0, 1, 3, 2))), ("img", s[1], s[3], s[2])


@spelling("transpose/torch", "img")
def _(s, rng):
    return Block(lambda m, x: torch.transpose(x, 2, 3)), ("img", s[1], s[3], s[2])


@spelling("transpose/method", "img")
def _(s, rng):
    return Block(lambda m, x: x.transpose(-1, -2)), ("img", s[1], s[3], s[2])


@spelling("mean/keepdim-channels", "img")
def _(s, rng):
    return Block(lambda m, x: x.mean(dim=1, keepdim=True)), ("img", 1, s[2], s[3])


@spelling("mean/torch-spatial", "img")
def _(s, rng):
    return Block(lambda m, x: torch.mean(x, (2, 3), keepdim=True)), ("img", s[1], 1, 1)


@spelling("reshape/view-roundtrip", "img", "reshape", "size")
def _(s, rng):
    return Block(lambda m, x: x.contiguous().view(x.size(0), -1).view(-1, m.c, m.h, m.w), c=s[1], h=s[2], w=s[3]), s


# ---------------------------------------------------------------- image -> vector
@spelling("flatten/module", "img->vec")
def _(s, rng):
    return Block(lambda m, x: m.flat(x), flat=nn.Flatten()), ("vec", s[1] * s[2] * s[3])


@spelling("flatten/torch", "img->vec")
def _(s, rng):
    return Block(lambda m, x: torch.flatten(x, 1)), ("vec", s[1] * s[2] * s[3])


@spelling("flatten/method", "img->vec")
def _(s, rng):
    return Block(lambda m, x: x.flatten(start_dim=1)), ("vec", s[1] * s[2] * s[3])


@spelling("reshape/view-size", "img->vec", "reshape", "size")
def _(s, rng):
    return Block(lambda m, x: x.contiguous().view(x.size(0), -1)), ("vec", s[1] * s[2] * s[3])


@spelling("reshape/reshape-shape", "img->vec", "reshape", "getattr")
def _(s, rng):
    return Block(lambda m, x: x.reshape(x.shape[0], -1)), ("vec", s[1] * s[2] * s[3])


@spelling("mean/spatial", "img->vec")
def _(s, rng):
    return Block(lambda m, x: x.mean((2, 3))), ("vec", s[1])


@spelling("layer_norm/module", "vec")
def _(s, rng):
    norm = nn.LayerNorm(s[1])
    with torch.no_grad():
        norm.weight.copy_(_tensor(s[1], rng=rng))
        norm.bias.copy_(_tensor(s[1], rng=rng) * 0.3)
    return Block(lambda m, x: m.norm(x * 3.0), norm=norm), s


@spelling("layer_norm/channels-last", "img", "layer_norm", "permute", "mul", "add")
def _(s, rng):
    # channels kept apart (a spread offset): a row of nearly equal entries makes the model's own float32 layer
    # norm err by more than the tests' rounding tolerance
    c = s[1]
    return Block(lambda m, x: F.layer_norm((x * 3.0 + m.spread).permute(0, 2, 3, 1), (c,), m.w, m.b, 1e-6)
                 .permute(0, 3, 1, 2), spread=torch.arange(c, dtype=torch.float32).reshape(1, c, 1, 1) * 2.0,
                 w=_param(c, rng=rng, scale=1.0), b=_param(c, rng=rng, scale=0.3)), s


@spelling("matmul/constant", "vec")
def _(s, rng):
    out = rng.randint(1, 5)
    return Block(lambda m, x: x @ m.w, w=_param(s[1], out, rng=rng)), ("vec", out)


@spelling("matmul/interval-interval", "img", "matmul", "transpose", "mul")
def _(s, rng):
    _, c, h, w = s
    return Block(lambda m, x: torch.matmul(x, x.transpose(-1, -2) * 0.5)), ("img", c, h, h)


@spelling("scaled_dot_product_attention/functional", "img", "scaled_dot_product_attention", "mul")
def _(s, rng):
    return Block(lambda m, x: F.scaled_dot_product_attention(x * 3.0, x, x)), s


@spelling("multi_head_attention/module", "img", "multi_head_attention", "flatten", "transpose", "reshape",
          "getitem", "size")
def _(s, rng):
    _, c, h, w = s
    attention = nn.MultiheadAttention(c, 1, batch_first=True)

    def forward(m, x):
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = m.attention(tokens, tokens, tokens, need_weights=False)
        return out.transpose(1, 2).reshape(x.size(0), c, h, w)

    return Block(forward, attention=attention), s


@spelling("chunk/method", "img", "chunk", "getitem", "cat", "mul")
def _(s, rng):
    def forward(m, x):
        a, b = x.chunk(2, dim=2)
        return torch.cat([b, a * 0.5], dim=2)

    return Block(forward), ("img", s[1], s[2] - s[2] // 2 + s[2] // 2, s[3])


@spelling("split/torch", "img", "split", "getitem", "cat", "neg")
def _(s, rng):
    def forward(m, x):
        a, b = torch.split(x, [1, x.shape[3] - 1], dim=3)
        return torch.cat([-b, a], dim=3)

    return Block(forward), s


@spelling("unbind/method", "img", "unbind", "getitem", "unsqueeze", "cat", "mul")
def _(s, rng):
    def forward(m, x):
        rows = x.unbind(2)
        return torch.cat([rows[i].unsqueeze(2) * (1.0 + i) for i in range(s[2])], dim=2)

    return Block(forward), s


@spelling("expand/channel", "img", "expand", "getitem")
def _(s, rng):
    return Block(lambda m, x: x[:, :1].expand(-1, 3, -1, -1)), ("img", 3, s[2], s[3])


@spelling("unflatten/method", "img", "unflatten", "flatten")
def _(s, rng):
    return Block(lambda m, x: x.flatten(2).unflatten(2, (s[2], s[3]))), s


@spelling("adaptive_max_pool2d/module", "img")
def _(s, rng):
    return Block(lambda m, x: m.pool(x), pool=nn.AdaptiveMaxPool2d((2, 2))), ("img", s[1], 2, 2)


@spelling("adaptive_max_pool2d/functional", "img")
def _(s, rng):
    return Block(lambda m, x: F.adaptive_max_pool2d(x, 1)), ("img", s[1], 1, 1)


@spelling("mean/torch-dim-list", "img->vec")
def _(s, rng):
    return Block(lambda m, x: torch.mean(x, dim=[2, 3])), ("vec", s[1])


# ---------------------------------------------------------------- building
BY_STAGE: dict[str, list[Spelling]] = {}
for _s in SPELLINGS:
    BY_STAGE.setdefault(_s.stage, []).append(_s)
BY_NAME = {s.name: s for s in SPELLINGS}

INPUT_SHAPE = ("img", 2, 6, 6)
CLASSES = 3


def build_net(choices: list[Spelling], rng: random.Random) -> nn.Module:
    """Chain the chosen blocks (image stage, one transition, vector stage) and end with a linear to CLASSES."""
    shape = INPUT_SHAPE
    blocks = []
    for spec in choices:
        if spec.stage == "img->vec" and shape[0] != "img":
            continue
        if spec.stage in ("img", "vec") and spec.stage != shape[0]:
            continue
        block, shape = spec.build(shape, rng)
        blocks.append(block)
    if shape[0] == "img":
        blocks.append(Block(lambda m, x: torch.flatten(x, 1)))
        shape = ("vec", shape[1] * shape[2] * shape[3])
    blocks.append(Block(lambda m, x: m.fc(x), fc=nn.Linear(shape[1], CLASSES)))
    torch.manual_seed(rng.randrange(2**31))
    net = nn.Sequential(*blocks)
    for module in net.modules():  # fresh default inits for the stock layers, seeded
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return net.eval()


def net_for(spec: Spelling, seed: int = 0) -> nn.Module:
    """The smallest classifier that runs one spelling."""
    rng = random.Random(seed)
    if spec.stage == "vec":
        return build_net([BY_NAME["flatten/torch"], spec], rng)
    return build_net([spec], rng)


class _Values(torch.fx.Interpreter):
    """The real graph, every node's value kept (independent of the code under test)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        self.values[n.name] = out = super().run_node(n)
        return out


def real_values(gm, x) -> dict:
    """Every node's real value on input ``x``, by name."""
    interp = _Values(gm)
    with torch.no_grad():
        interp.run(x)
    return interp.values
