"""One canonical op key per operation, whatever its torch.fx spelling.

A node can spell the same operation as an ``nn.Module`` call, a ``torch`` or
``torch.nn.functional`` function, a tensor method, an ATen overload (graphs
from ``torch.export``) or an in-place variant.  Every later stage (sites,
bound rules, serialisation) looks operations up by the key returned by
:func:`canonical_op`, so a new spelling is one line in a table here.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# Operations whose output is a CTT/SafetyNet/NIC site: every element-wise activation (design section 5, "Sites
# beyond rectifiers"), the gates of squeeze-excitation (sigmoid, hardsigmoid) included.
SITE_OPS = frozenset({"relu", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "hardswish", "mish",
                      "sigmoid", "hardsigmoid", "tanh", "softplus"})
# Sites whose natural values sit at 0 on a half-line (rectifiers): "active" means above 0 there.
RECTIFIER_OPS = frozenset({"relu", "relu6"})

MODULE_SPELLINGS: dict[type, str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Linear: "linear",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardtanh: "hardtanh",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.Softplus: "softplus",
    nn.BatchNorm1d: "batch_norm",
    nn.BatchNorm2d: "batch_norm",
    nn.MaxPool2d: "max_pool2d",
    nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
    nn.LayerNorm: "layer_norm",
    nn.MultiheadAttention: "multi_head_attention",
    nn.Unflatten: "unflatten",
    nn.Flatten: "flatten",
    nn.Dropout: "identity",
    nn.Dropout1d: "identity",
    nn.Dropout2d: "identity",
    nn.AlphaDropout: "identity",
    nn.Identity: "identity",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
}

_FUNCTION_TABLE: list[tuple[str, list[Any]]] = [
    ("conv1d", [F.conv1d, torch.conv1d, aten.conv1d.default]),
    ("conv2d", [F.conv2d, torch.conv2d, aten.conv2d.default]),
    ("linear", [F.linear, aten.linear.default]),
    ("relu", [F.relu, torch.relu, torch.relu_, aten.relu.default, aten.relu_.default]),
    ("relu6", [F.relu6, aten.relu6.default]),
    ("hardtanh", [F.hardtanh, F.hardtanh_, aten.hardtanh.default, aten.hardtanh_.default]),
    ("leaky_relu", [F.leaky_relu, F.leaky_relu_, aten.leaky_relu.default, aten.leaky_relu_.default]),
    ("sigmoid", [torch.sigmoid, F.sigmoid, torch.sigmoid_, aten.sigmoid.default, aten.sigmoid_.default]),
    ("tanh", [torch.tanh, F.tanh, torch.tanh_, aten.tanh.default, aten.tanh_.default]),
    ("silu", [F.silu, aten.silu.default, aten.silu_.default]),
    ("gelu", [F.gelu, aten.gelu.default, aten.gelu_.default]),
    ("hardswish", [F.hardswish, aten.hardswish.default, aten.hardswish_.default]),
    ("hardsigmoid", [F.hardsigmoid, aten.hardsigmoid.default, aten.hardsigmoid_.default]),
    ("mish", [F.mish, aten.mish.default, aten.mish_.default]),
    ("elu", [F.elu, F.elu_, aten.elu.default, aten.elu_.default]),
    ("softplus", [F.softplus, aten.softplus.default]),
    ("batch_norm", [F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default]),
    ("max_pool2d", [F.max_pool2d, torch.max_pool2d, aten.max_pool2d.default]),
    ("avg_pool2d", [F.avg_pool2d, aten.avg_pool2d.default]),
    ("adaptive_avg_pool2d", [F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default]),
    ("adaptive_max_pool2d", [F.adaptive_max_pool2d, aten.adaptive_max_pool2d.default]),
    ("layer_norm", [F.layer_norm, aten.layer_norm.default]),
    ("scaled_dot_product_attention", [F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default]),
    ("matmul", [torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default]),
    ("flatten", [torch.flatten, aten.flatten.using_ints]),
    ("reshape", [torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default]),
    ("unflatten", [torch.unflatten, aten.unflatten.int]),
    ("squeeze", [torch.squeeze, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims]),
    ("unsqueeze", [torch.unsqueeze, aten.unsqueeze.default]),
    ("expand", [aten.expand.default]),
    ("chunk", [torch.chunk, aten.chunk.default]),
    ("split", [torch.split, aten.split.Tensor, aten.split_with_sizes.default]),
    ("unbind", [torch.unbind, aten.unbind.int]),
    ("permute", [torch.permute, aten.permute.default]),
    ("transpose", [torch.transpose, aten.transpose.int]),
    ("add", [operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar]),
    ("sub", [operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub_.Tensor, aten.sub.Scalar]),
    ("rsub", [torch.rsub, aten.rsub.Scalar, aten.rsub.Tensor]),
    ("mul", [operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar]),
    ("div", [operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar,
             aten.div.Tensor_mode]),
    ("reciprocal", [torch.reciprocal, aten.reciprocal.default]),
    ("neg", [operator.neg, torch.neg, aten.neg.default]),
    ("cat", [torch.cat, torch.concat, aten.cat.default, aten.concat.default]),
    ("mean", [torch.mean, aten.mean.dim, aten.mean.default]),
    ("identity", [F.dropout, F.dropout2d, torch.dropout, aten.dropout.default, aten.clone.default,
                  aten.alias.default, aten.contiguous.default]),
    ("softmax", [F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default]),
    ("log_softmax", [F.log_softmax, torch.log_softmax, aten.log_softmax.int, aten._log_softmax.default]),
    ("getitem", [operator.getitem]),
    ("slice", [aten.slice.Tensor]),  # x[a:b] in torch.export graphs
    ("select", [aten.select.int]),  # x[:, i] in torch.export graphs
    ("size", [aten.sym_size.int]),
    ("getattr", [getattr]),  # x.shape / x.ndim in symbolically traced graphs
    ("floordiv", [operator.floordiv]),  # shape arithmetic: channels // groups (ShuffleNet's channel shuffle)
]

FUNCTION_SPELLINGS: dict[Any, str] = {fn: key for key, fns in _FUNCTION_TABLE for fn in fns}

METHOD_SPELLINGS: dict[str, str] = {
    "relu": "relu", "relu_": "relu",
    "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh",
    "flatten": "flatten", "unflatten": "unflatten",
    "view": "reshape", "reshape": "reshape",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "expand": "expand",
    "chunk": "chunk", "split": "split", "unbind": "unbind", "matmul": "matmul", "bmm": "matmul",
    "permute": "permute", "transpose": "transpose",
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "neg": "neg",
    "mean": "mean",
    "reciprocal": "reciprocal",
    "contiguous": "identity", "clone": "identity",
    "softmax": "softmax", "log_softmax": "log_softmax",
    "size": "size", "dim": "size",
}


def _module_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    module = gm.get_submodule(node.target)
    for cls in type(module).__mro__:
        if cls in MODULE_SPELLINGS:
            key = MODULE_SPELLINGS[cls]
            if key == "hardtanh" and (module.min_val, module.max_val) == (0.0, 6.0):
                return "relu6"
            return key
    return None


def _hardtanh_is_relu6(node: fx.Node) -> bool:
    args = list(node.args[1:3])
    lo = args[0] if len(args) > 0 else node.kwargs.get("min_val", -1.0)
    hi = args[1] if len(args) > 1 else node.kwargs.get("max_val", 1.0)
    return (lo, hi) == (0.0, 6.0) or (lo, hi) == (0, 6)


def canonical_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The canonical key of ``node``'s operation, or None when no spelling is known.

    Placeholders, outputs and ``get_attr`` nodes have keys of their own so that
    every node of a supported graph has one.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        key = _module_op(gm, node)
    elif node.op == "call_function":
        key = FUNCTION_SPELLINGS.get(node.target)
    elif node.op == "call_method":
        key = METHOD_SPELLINGS.get(node.target)
    else:
        key = None
    if key == "hardtanh" and node.op != "call_module" and _hardtanh_is_relu6(node):
        return "relu6"
    return key


def op_spelling(gm: fx.GraphModule, node: fx.Node) -> str:
    """A human-readable spelling of the node's operation, for error messages."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and not str(target).startswith("aten") else str(target)


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the node mutates its first argument (``relu_``, ``inplace=True``, ``+=``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if node.kwargs.get("inplace", False):
            return True
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name.split("::")[-1]
        return name.endswith("_") and not name.startswith("_")
    return False


OUT_OF_PLACE_FUNCTIONS: dict[Callable, Callable] = {
    torch.relu_: torch.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    F.hardtanh_: F.hardtanh,
    F.leaky_relu_: F.leaky_relu,
    F.elu_: F.elu,
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.sigmoid_.default: aten.sigmoid.default,
    aten.tanh_.default: aten.tanh.default,
    aten.silu_.default: aten.silu.default,
    aten.gelu_.default: aten.gelu.default,
    aten.hardswish_.default: aten.hardswish.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default,
    aten.mish_.default: aten.mish.default,
    aten.elu_.default: aten.elu.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.div_.Tensor: aten.div.Tensor,
    aten.mul_.Scalar: aten.mul.Scalar,
    aten.add_.Scalar: aten.add.Scalar,
}

# Calls that only check something at run time (shapes, the batch size) and return nothing: dropped at trace time.
ASSERTIONS: frozenset = frozenset({
    torch._assert, torch._assert_async, aten._assert_async.default, aten._assert_async.msg,
    aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
})


def is_assertion(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ASSERTIONS


# Functions that are the identity in eval mode, by qualified name (a model's library need not be installed to
# read its graph): name -> (position, keyword) of the ``training`` argument.  torchvision wraps stochastic depth
# for torch.fx, so it stays one call in a symbolically traced graph; in eval it returns its input.
EVAL_IDENTITIES: dict[str, tuple[int, str]] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": (3, "training"),
}


def eval_identity_input(node: fx.Node) -> fx.Node | None:
    """The input an eval-mode identity call returns (stochastic depth with training=False), else None."""
    if node.op != "call_function":
        return None
    name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
    if name not in EVAL_IDENTITIES:
        return None
    position, keyword = EVAL_IDENTITIES[name]
    training = node.args[position] if len(node.args) > position else node.kwargs.get(keyword, True)
    source = node.args[0] if node.args else None
    if training is False and isinstance(source, fx.Node):
        return source
    return None
