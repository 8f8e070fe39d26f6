"""A torch.fx GraphModule as JSON + numpy arrays, loadable without unpickling anything.

:func:`graph_to_json` turns the clean GraphModule that
:func:`harden.graph.trace.trace` produces (from ``torch.fx.symbolic_trace`` or
from ``torch.export``) into a JSON-serialisable document and a dict of numpy
arrays (every parameter, buffer and tensor attribute, keyed by its qualified
name).  :func:`graph_from_json` rebuilds it: same node names and order, same
module paths, bit-identical outputs.

Nothing in a document is ever executed or imported by name.  Loading resolves:

- module classes only as ``getattr(torch.nn, name)`` when that is an
  ``nn.Module`` subclass defined under ``torch.nn.modules``; a module is
  rebuilt with ``cls.__new__`` + ``nn.Module.__init__`` and its stored plain
  attributes (no constructor runs);
- module classes only from ``MODULE_CLASSES`` (the layers of image classifiers);
- call_function targets only from an allowlist: harden's op tables
  (``harden.graph.ops.FUNCTION_SPELLINGS``, ``OUT_OF_PLACE_FUNCTIONS``),
  ``PURE_FUNCTIONS``, ``getattr`` (with a fixed set of attribute names),
  ``operator.getitem`` and the ATen overloads of ``harden.core.aten_ops.ATEN_OPS``,
  never a mutating one; every ATen call's arguments are checked against the op's schema
  (:func:`check_aten_call`: literal types, strided layout, CPU device, real dtypes);
- call_method targets only from a list of Tensor method names.

Sizes are a separate check (:func:`harden.graph.sizes.check_sizes`): which
tensors a graph creates depends on its input's shape, known to the bundle.

fx compiles a GraphModule's ``forward`` from Python source it generates from
the graph, so every string that reaches that source (node names, placeholder
and attribute targets, kwarg names, method names) is validated before the
graph is attached.

Document layout (``format`` 1)::

    {"format": 1, "kind": "harden.fx-graph", "class_name": "Net",
     "root": <module>, "nodes": [<node>, ...]}
    <module>  = {"class": "Conv2d", "training": false,
                 "attributes": [[name, value], ...],       # simple __dict__ entries
                 "parameters": [[name, <tensor>|null], ...],
                 "buffers": [[name, <tensor>|null], ...],
                 "tensor_attributes": [[name, <tensor>], ...],  # plain tensor attributes
                 "children": [[name, <module>|null], ...]}
              | {"same_as": "qualified.path"}               # a shared module
    <tensor>  = {"dtype": "float32", "shape": [..], "requires_grad": b,
                 "persistent": b (buffers), "bits": "uint16" (dtypes numpy lacks)}
              | {"same_as": "qualified.name"}               # a shared tensor
    <node>    = {"name": "conv1", "op": "call_module", "target": "features.0",
                 "args": [<value>, ...], "kwargs": [[name, <value>], ...]}
    <value>   = null | bool | int | float | str | [<value>, ...]
              | {"$": "node", "v": name} | {"$": "tuple", "v": [...]}
              | {"$": "dict", "v": [[<value>, <value>], ...]}
              | {"$": "float", "v": "inf" | "-inf" | "nan"}
              | {"$": "slice", "v": [start, stop, step]} | {"$": "ellipsis"}
              | {"$": "size", "v": [int, ...]} | {"$": "dtype", "v": "float32"}
              | {"$": "device", "v": "cpu"} | {"$": "layout", "v": "strided"}
              | {"$": "memory_format", "v": "contiguous_format"}

A call_function target is a name such as ``"torch.relu"``,
``"torch.nn.functional.relu"``, ``"operator.add"`` or ``"aten.conv2d.default"``.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import math
import operator
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from harden.core.aten_ops import ATEN_OPS
from harden.core.limits import MAX_TOTAL_ELEMENTS, check_elements
from harden.errors import HardenError

FORMAT = 1
KIND = "harden.fx-graph"

_OPS = ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output")

# Attributes nn.Module.__init__ creates; they are rebuilt, never stored or loaded.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"} | {"_compiled_call_impl"}
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ATOM = re.compile(r"^[A-Za-z0-9_]+$")  # one part of a qualified path ("features", "0")
_ATEN = re.compile(r"^aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")

# Tensor attributes a graph may read with getattr(x, "<name>") (symbolic tracing of ``x.shape``).
GETATTR_NAMES = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "T", "mT", "data", "requires_grad", "is_cuda",
})

# Tensor methods a call_method node may name, besides harden.graph.ops.METHOD_SPELLINGS.
EXTRA_METHODS = frozenset({
    "size", "dim", "numel", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "contiguous", "clone", "detach", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow", "select",
    "to", "type_as", "float", "double", "half", "int", "long", "bool",
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "norm", "std", "var",
    "clamp", "clamp_min", "clamp_max", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "square",
    "relu", "sigmoid", "tanh", "softmax", "log_softmax", "matmul", "add", "sub", "mul", "div", "neg",
})

# Side-effect-free torch functions a graph may call besides harden's op spellings: the activations,
# normalisations and tensor algebra of common classifiers (MobileNet's hardswish, ViT's GELU and layer norm,
# SiLU, ...).  A curated list rather than "anything in torch": torch also holds functions that read and write
# files (torch.load, torch.save).  Ops without a bound rule still make `harden certify` refuse the model, by name.
PURE_FUNCTIONS = (
    F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.selu, F.celu, F.softplus, F.softsign,
    F.logsigmoid, F.tanhshrink, F.layer_norm, F.group_norm, F.instance_norm, F.normalize, F.pad, F.interpolate,
    F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.max_pool1d, F.avg_pool1d, F.scaled_dot_product_attention,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.sum, torch.amax, torch.amin,
    torch.matmul, torch.bmm, torch.stack, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.erf,
    torch.pow, torch.where, torch.maximum, torch.minimum, torch.square, torch.addmm, torch.einsum,
)

# torch.nn module classes a graph file may rebuild (by name, without running a constructor): the layers of
# image classifiers.  Namespaces (Sequential, ModuleList, ModuleDict) hold children only.
MODULE_CLASSES: frozenset[str] = frozenset({
    "Module", "Sequential", "ModuleList", "ModuleDict",
    "Conv1d", "Conv2d", "Linear", "Bilinear", "Identity", "Flatten", "Unflatten",
    "BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "LocalResponseNorm",
    "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d",
    "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "Hardtanh", "Sigmoid", "Tanh", "SiLU", "GELU", "Hardswish",
    "Hardsigmoid", "Mish", "ELU", "SELU", "CELU", "Softplus", "Softsign", "Softshrink", "Hardshrink",
    "Tanhshrink", "LogSigmoid", "Softmax", "LogSoftmax",
    "MultiheadAttention", "NonDynamicallyQuantizableLinear",   # a transformer's attention and its projection
})

# Namespaces searched, in order, for a human-readable function name.
_FUNCTION_NAMESPACES = (("operator", operator), ("builtins", builtins), ("torch", torch),
                        ("torch.nn.functional", F))


# ----------------------------------------------------------------------------- allowlists


def allowed_methods() -> frozenset[str]:
    from harden.graph.ops import METHOD_SPELLINGS

    return frozenset(METHOD_SPELLINGS) | EXTRA_METHODS


def _function_name(fn: Any) -> str | None:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn) if fn.namespace == "aten" else None
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return None
    for prefix, namespace in _FUNCTION_NAMESPACES:
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else None


@functools.lru_cache(maxsize=1)
def allowed_functions() -> Mapping[str, Callable]:
    """The explicit call_function allowlist: stored name -> function (built once; read-only)."""
    from harden.graph.ops import FUNCTION_SPELLINGS, OUT_OF_PLACE_FUNCTIONS

    candidates = [*FUNCTION_SPELLINGS, *OUT_OF_PLACE_FUNCTIONS, *OUT_OF_PLACE_FUNCTIONS.values(), *PURE_FUNCTIONS,
                  getattr, operator.getitem]
    table: dict[str, Callable] = {}
    for fn in candidates:
        name = _function_name(fn)
        if name is not None and name not in table and not isinstance(fn, torch._ops.OpOverload):
            table[name] = fn
    for name in sorted(ATEN_OPS):   # the one list of ATen overloads (harden.core.aten_ops)
        op = _aten_overload(name)
        if op is not None and not _mutating(op):
            table.setdefault(name, op)
    return MappingProxyType(table)


def _aten_overload(name: str) -> torch._ops.OpOverload | None:
    match = _ATEN.match(name)
    if match is None:
        return None
    try:
        op = getattr(getattr(torch.ops.aten, match.group(1)), match.group(2))
    except (AttributeError, RuntimeError):
        return None  # an op this torch does not have: the table may list ops of newer versions
    return op if isinstance(op, torch._ops.OpOverload) else None


def _mutating(fn: Any) -> bool:
    return isinstance(fn, torch._ops.OpOverload) and fn._schema.is_mutable


def _resolve_function(name: Any, node_name: str) -> Callable:
    if not isinstance(name, str):
        raise HardenError(f"graph node {node_name!r}: call_function target must be a string, got {_kind(name)}")
    table = allowed_functions()
    if name in table:
        return table[name]
    raise HardenError(
        f"graph node {node_name!r} calls {name!r:.80}, which is not an allowed function (harden's op spellings, "
        "getattr, operator.getitem and the ATen ops of harden.core.aten_ops.ATEN_OPS only)"
    )


# ----------------------------------------------------------------------------- ATen argument checks

_SCHEMA_TYPE = re.compile(r"^(Optional|List)\[(.*)\]$")
_REAL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                          torch.int16, torch.int32, torch.int64, torch.bool})
_MAX_STRING = 64


def _value_fits(kind: str, value: Any) -> bool:
    """Whether a literal (or a node) may stand for an argument of schema type ``kind``."""
    match = _SCHEMA_TYPE.match(kind)
    if match:
        outer, inner = match.groups()
        if outer == "Optional":
            return value is None or _value_fits(inner, value)
        return isinstance(value, (list, tuple)) and all(_value_fits(inner, v) for v in value)
    if isinstance(value, fx.Node):  # a tensor or a symbolic size computed by the graph
        return kind in ("Tensor", "int", "float", "number", "bool", "SymInt")
    if kind == "Tensor":  # torch.export passes Python scalars where a Tensor is wrapped (x + 2)
        return type(value) in (int, float, bool)
    if kind in ("int", "SymInt"):
        return type(value) in (int, bool)
    if kind == "float":
        return type(value) in (int, float)
    if kind in ("number", "Scalar"):
        return type(value) in (int, float, bool)
    if kind == "bool":
        return type(value) is bool
    if kind == "str":
        return isinstance(value, str) and len(value) <= _MAX_STRING
    if kind == "ScalarType":
        return isinstance(value, torch.dtype) and value in _REAL_DTYPES
    if kind == "Layout":
        return value is torch.strided
    if kind == "MemoryFormat":
        return isinstance(value, torch.memory_format)
    if kind == "Device":
        return isinstance(value, torch.device) and value.type == "cpu"
    return False  # Tensor literals, generators, storages, streams, ...: never from a file


def check_aten_call(op: torch._ops.OpOverload, args: tuple, kwargs: dict, node_name: str) -> None:
    """Refuse an ATen call whose arguments do not fit the op's schema (count, names, literal types)."""
    schema = op._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    by_name = {a.name: a for a in schema.arguments}
    if len(args) > len(positional):
        raise HardenError(f"graph node {node_name!r}: {op} takes {len(positional)} positional arguments, got {len(args)}")
    bound = list(zip(positional, args))
    for key, value in kwargs.items():
        if key not in by_name or key in {a.name for a, _ in bound}:
            raise HardenError(f"graph node {node_name!r}: {op} has no keyword argument {key!r} (or got it twice)")
        bound.append((by_name[key], value))
    given = {a.name for a, _ in bound}
    missing = [a.name for a in schema.arguments if a.name not in given and not a.has_default_value()]
    if missing:
        raise HardenError(f"graph node {node_name!r}: {op} misses argument(s) {', '.join(missing)}")
    for argument, value in bound:
        if not _value_fits(str(argument.real_type), value):
            raise HardenError(f"graph node {node_name!r}: argument {argument.name!r} of {op} must be "
                              f"{argument.real_type}, got {_kind(value)} {value!r:.40}")


# torch.nn module classes that torch.nn does not export by name: nn.MultiheadAttention's output projection.
EXTRA_MODULE_CLASSES: Mapping[str, type] = MappingProxyType({
    "NonDynamicallyQuantizableLinear": nn.modules.linear.NonDynamicallyQuantizableLinear,
})


def _nn_class(name: Any) -> type | None:
    """``getattr(torch.nn, name)`` for a name of MODULE_CLASSES (an nn.Module class under torch.nn.modules)."""
    if not isinstance(name, str) or name not in MODULE_CLASSES:
        return None
    cls = EXTRA_MODULE_CLASSES.get(name) or getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules"):
        return cls
    return None


# ----------------------------------------------------------------------------- helpers


def _kind(value: Any) -> str:
    return type(value).__name__


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: Any, where: str = "graph file") -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) and _IDENT.match(name) else None
    if not isinstance(dtype, torch.dtype):
        raise HardenError(f"{where}: unknown dtype {name!r}")
    return dtype


_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


# ----------------------------------------------------------------------------- values


def _encode(value: Any, where: str, allow_nodes: bool = True) -> Any:
    """A JSON value for an fx argument; every non-JSON-native type is tagged."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        if math.isnan(value):
            return {"$": "float", "v": "nan"}
        if math.isinf(value):
            return {"$": "float", "v": "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, fx.Node):
        if not allow_nodes:
            raise HardenError(f"{where}: a graph node cannot appear here")
        return {"$": "node", "v": value.name}
    if isinstance(value, torch.Size):
        return {"$": "size", "v": [_encode(v, where, allow_nodes) for v in value]}
    if type(value) is tuple:
        return {"$": "tuple", "v": [_encode(v, where, allow_nodes) for v in value]}
    if isinstance(value, list):  # includes fx's immutable_list
        return [_encode(v, where, allow_nodes) for v in value]
    if isinstance(value, dict):  # includes fx's immutable_dict
        return {"$": "dict", "v": [[_encode(k, where, allow_nodes), _encode(v, where, allow_nodes)]
                                   for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$": "slice", "v": [_encode(v, where, allow_nodes) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, torch.dtype):
        return {"$": "dtype", "v": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"$": "device", "v": str(value)}
    if isinstance(value, torch.layout):
        return {"$": "layout", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"$": "memory_format", "v": str(value).removeprefix("torch.")}
    raise HardenError(f"{where}: cannot store a value of type {_kind(value)} ({value!r:.60})")


_TAGS = frozenset({"node", "tuple", "dict", "float", "slice", "ellipsis", "size", "dtype", "device", "layout",
                   "memory_format"})


def _decode(value: Any, where: str, nodes: dict[str, fx.Node] | None) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, where, nodes) for v in value]
    if not isinstance(value, dict):
        raise HardenError(f"{where}: malformed value of type {_kind(value)}")
    tag = value.get("$")
    if not isinstance(tag, str) or tag not in _TAGS:
        raise HardenError(f"{where}: unknown value tag {tag!r:.40}")
    if tag == "ellipsis" and set(value) == {"$"}:
        return Ellipsis
    if set(value) != {"$", "v"}:
        raise HardenError(f"{where}: malformed tagged value (keys {sorted(map(str, value))})")
    inner = value["v"]
    if tag == "node":
        if nodes is None:
            raise HardenError(f"{where}: a graph node cannot appear here")
        if not isinstance(inner, str) or inner not in nodes:
            raise HardenError(f"{where}: reference to unknown or later node {inner!r}")
        return nodes[inner]
    if tag == "float":
        if inner not in ("inf", "-inf", "nan"):
            raise HardenError(f"{where}: malformed float {inner!r}")
        return float(inner)
    if tag in ("dtype", "device", "layout", "memory_format") and not isinstance(inner, str):
        raise HardenError(f"{where}: malformed {tag} {inner!r}")
    if tag == "dtype":
        return _torch_dtype(inner, where)
    if tag == "device":
        try:
            return torch.device(inner)
        except (RuntimeError, ValueError):
            raise HardenError(f"{where}: malformed device {inner!r}") from None
    if tag in ("layout", "memory_format"):
        expected = torch.layout if tag == "layout" else torch.memory_format
        result = getattr(torch, inner, None) if _IDENT.match(inner) else None
        if not isinstance(result, expected):
            raise HardenError(f"{where}: unknown {tag} {inner!r}")
        return result
    if not isinstance(inner, list):
        raise HardenError(f"{where}: malformed {tag!r} value")
    if tag == "tuple":
        return tuple(_decode(v, where, nodes) for v in inner)
    if tag == "size":
        if not all(type(v) is int for v in inner):
            raise HardenError(f"{where}: malformed torch.Size {inner!r:.60}")
        return torch.Size(inner)
    if tag == "slice":
        if len(inner) != 3:
            raise HardenError(f"{where}: malformed slice")
        return slice(*(_decode(v, where, nodes) for v in inner))
    if tag == "dict":
        result = {}
        for pair in inner:
            if not isinstance(pair, list) or len(pair) != 2:
                raise HardenError(f"{where}: malformed dict entry")
            key = _decode(pair[0], where, nodes)
            try:
                result[key] = _decode(pair[1], where, nodes)
            except TypeError:
                raise HardenError(f"{where}: unhashable dict key") from None
        return result
    raise HardenError(f"{where}: malformed {tag!r} value")


# ----------------------------------------------------------------------------- save


class _Saver:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.arrays: dict[str, np.ndarray] = {}
        self.tensor_paths: dict[int, tuple[str, bool]] = {}  # id(tensor) -> (qualified name, is parameter)
        self.module_paths: dict[int, str] = {}
        self.called: dict[str, str] = {}  # module path -> name of a node that calls it

    def run(self) -> tuple[dict, dict[str, np.ndarray]]:
        gm = self.gm
        codegen = type(gm.graph._codegen)
        if codegen is not fx.graph.CodeGen:
            raise HardenError(
                f"cannot store a graph with a {codegen.__name__} calling convention; "
                "pass it through harden.graph.trace.trace first"
            )
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.called.setdefault(str(node.target), node.name)
        nodes = [self._node(node) for node in gm.graph.nodes]
        root = self._module(gm, "", called_by=None, is_root=True)
        doc = {"format": FORMAT, "kind": KIND, "class_name": type(gm).__name__, "root": root, "nodes": nodes}
        return doc, self.arrays

    # -- nodes

    def _node(self, node: fx.Node) -> dict:
        where = f"graph node {node.name!r}"
        if not _IDENT.match(node.name):
            raise HardenError(f"{where}: the node name is not a Python identifier")
        target = node.target
        if node.op in ("get_attr", "call_module") and not all(
            _ATOM.match(atom) for atom in str(target).split(".")
        ):
            raise HardenError(f"{where}: target {target!r} has a part that is not an identifier or a number")
        if node.op == "placeholder" and not _IDENT.match(str(target)):
            raise HardenError(f"{where}: placeholder {target!r} (varargs or keyword-only?) cannot be stored")
        bad_keys = [k for k in node.kwargs if not _IDENT.match(k)]
        if bad_keys:
            raise HardenError(f"{where}: keyword argument names {bad_keys} cannot be stored")
        if node.op == "call_function":
            target = self._function(node)
        elif not isinstance(target, str):
            raise HardenError(f"{where}: {node.op} target must be a string, got {_kind(target)}")
        if node.op == "call_method" and target not in allowed_methods():
            raise HardenError(f"{where} calls Tensor.{target}, which a harden graph file cannot store")
        return {
            "name": node.name,
            "op": node.op,
            "target": target,
            "args": [_encode(a, where) for a in node.args],
            "kwargs": [[k, _encode(v, where)] for k, v in node.kwargs.items()],
        }

    def _function(self, node: fx.Node) -> str:
        fn = node.target
        name = _function_name(fn)
        table = allowed_functions()
        if name is not None and table.get(name) is fn:
            if fn is getattr:
                _check_getattr(node.name, node.args, node.kwargs)
            if isinstance(fn, torch._ops.OpOverload):
                check_aten_call(fn, node.args, node.kwargs, node.name)
            return name
        spelling = name or repr(fn)
        raise HardenError(
            f"graph node {node.name!r} calls {spelling}, which a harden graph file cannot store "
            "(allowed: harden's op spellings, getattr, operator.getitem and the ATen ops of "
            "harden.core.aten_ops.ATEN_OPS)"
        )

    # -- modules

    def _module(self, module: nn.Module, path: str, called_by: str | None, is_root: bool = False) -> dict:
        if id(module) in self.module_paths:
            return {"same_as": self.module_paths[id(module)]}
        self.module_paths[id(module)] = path
        called_by = called_by or self.called.get(path)
        spec: dict[str, Any] = {}
        simple: list | None = None
        if not is_root:
            cls = type(module)
            allowed = _nn_class(cls.__name__) is cls
            if allowed:
                simple, problem = self._attributes(module)
            if called_by is not None:
                if not allowed:
                    raise HardenError(
                        f"graph node {called_by!r} calls module {path!r} of class {cls.__module__}.{cls.__qualname__}; "
                        "a harden graph file stores only torch.nn modules"
                    )
                if simple is None:
                    raise HardenError(f"graph node {called_by!r}: module {path!r} ({cls.__name__}) {problem}")
                hooked = [h for h in _FORWARD_HOOKS if getattr(module, h, None)]
                if hooked:
                    raise HardenError(
                        f"graph node {called_by!r}: module {path!r} has hooks ({', '.join(hooked)}), "
                        "which a harden graph file cannot store"
                    )
            # A module the graph does not call is only a namespace: keep its class when possible.
            spec["class"] = cls.__name__ if simple is not None else "Module"
        spec["training"] = bool(module.training)
        if not is_root:
            spec["attributes"] = simple or []
        prefix = f"{path}." if path else ""
        names = [*module._parameters, *module._buffers, *module._modules]
        bad = [n for n in names if not _ATOM.match(n)]
        if bad:
            raise HardenError(
                f"module {path or '<root>'!r}: member names {bad} are not identifiers or numbers, "
                "which a harden graph file cannot store"
            )
        spec["parameters"] = [[n, self._tensor(p, prefix + n, True, None)] for n, p in module._parameters.items()]
        spec["buffers"] = [
            [n, self._tensor(b, prefix + n, False, n not in module._non_persistent_buffers_set)]
            for n, b in module._buffers.items()
        ]
        spec["tensor_attributes"] = [
            [n, self._tensor(v, prefix + n, False, None)]
            for n, v in module.__dict__.items()
            if isinstance(v, torch.Tensor) and n not in _MODULE_INTERNALS
        ]
        spec["children"] = [
            [n, None if child is None else self._module(child, prefix + n, called_by)]
            for n, child in module._modules.items()
        ]
        return spec

    def _attributes(self, module: nn.Module) -> tuple[list | None, str]:
        out = []
        for name, value in module.__dict__.items():
            if name in _MODULE_INTERNALS or name == "training" or isinstance(value, torch.Tensor):
                continue
            try:
                out.append([name, _encode(value, name, allow_nodes=False)])
            except HardenError:
                return None, f"has attribute {name!r} of type {_kind(value)}, which a harden graph file cannot store"
        return out, ""

    def _tensor(self, tensor: torch.Tensor | None, qualname: str, parameter: bool, persistent: bool | None):
        if tensor is None:
            return None
        if id(tensor) in self.tensor_paths:
            return {"same_as": self.tensor_paths[id(tensor)][0]}
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided \
                or tensor.is_quantized or tensor.device.type == "meta":
            raise HardenError(f"tensor {qualname!r} ({_kind(tensor)}, {tensor.layout}) cannot be stored in a graph file")
        self.tensor_paths[id(tensor)] = (qualname, parameter)
        data = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        spec: dict[str, Any] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape),
                                "requires_grad": bool(tensor.requires_grad)}
        if persistent is not None:
            spec["persistent"] = persistent
        try:
            array = data.numpy()
        except (TypeError, RuntimeError):
            bits = _BITS.get(tensor.element_size())
            if bits is None or tensor.is_complex():
                raise HardenError(f"tensor {qualname!r} of dtype {tensor.dtype} cannot be stored in a graph file") from None
            array = data.view(bits).numpy()
            spec["bits"] = _dtype_name(bits)
        self.arrays[qualname] = array  # C-contiguous (np.ascontiguousarray would make 0-d arrays 1-d)
        return spec


def _check_getattr(node_name: str, args: Any, kwargs: Any) -> None:
    if kwargs or len(args) != 2 or not isinstance(args[1], str) or args[1] not in GETATTR_NAMES:
        raise HardenError(
            f"graph node {node_name!r}: getattr is allowed only as getattr(x, name) with name one of "
            f"{', '.join(sorted(GETATTR_NAMES))}"
        )


def graph_to_json(gm: fx.GraphModule) -> tuple[dict, dict[str, np.ndarray]]:
    """A JSON-serialisable description of ``gm`` and its tensors as numpy arrays, keyed by qualified name."""
    if not isinstance(gm, fx.GraphModule):
        raise HardenError(f"graph_to_json expects a torch.fx.GraphModule, got {_kind(gm)}")
    return _Saver(gm).run()


# ----------------------------------------------------------------------------- load


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise HardenError(f"{where}: expected an object, got {_kind(obj)}")
    if key not in obj:
        raise HardenError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise HardenError(f"{where}: {key!r} must be {names}, got {_kind(value)}")
    return value


def _pairs(obj: dict, key: str, where: str) -> list[tuple[str, Any]]:
    items = _field(obj, key, list, where)
    out = []
    for item in items:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise HardenError(f"{where}: malformed entry in {key!r}")
        out.append((item[0], item[1]))
    return out


def _check_atom(name: str, where: str) -> None:
    if not _ATOM.match(name):
        raise HardenError(f"{where}: invalid attribute name {name!r}")


def _check_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise HardenError(f"{where}: invalid target {path!r}")
    for atom in path.split("."):
        _check_atom(atom, where)
    return path


class _Loader:
    def __init__(self, arrays: dict[str, np.ndarray]):
        if not isinstance(arrays, dict):
            raise HardenError(f"graph file: arrays must be a dict, got {_kind(arrays)}")
        self.arrays = arrays
        self.elements = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}

    def module_into(self, target: nn.Module, spec: Any, path: str) -> None:
        """Fill ``target`` (a fresh module) from ``spec``."""
        where = f"graph file module {path or '<root>'!r}"
        training = _field(spec, "training", bool, where)
        object.__setattr__(target, "training", training)
        prefix = f"{path}." if path else ""
        for name, entry in _pairs(spec, "parameters", where):
            _check_atom(name, where)
            value = self.tensor(entry, prefix + name, True, where)
            target.register_parameter(name, value)
        for name, entry in _pairs(spec, "buffers", where):
            _check_atom(name, where)
            value = self.tensor(entry, prefix + name, False, where)
            persistent = True
            if isinstance(entry, dict) and "persistent" in entry:
                persistent = _field(entry, "persistent", bool, where)
            target.register_buffer(name, value, persistent=persistent)
        for name, entry in _pairs(spec, "tensor_attributes", where):
            self._plain_attribute(target, name, where)
            object.__setattr__(target, name, self.tensor(entry, prefix + name, False, where))
        for name, child_spec in _pairs(spec, "children", where):
            _check_atom(name, where)
            child = None if child_spec is None else self.module(child_spec, prefix + name)
            target.add_module(name, child)

    def module(self, spec: Any, path: str) -> nn.Module:
        where = f"graph file module {path!r}"
        if not isinstance(spec, dict):
            raise HardenError(f"{where}: expected an object, got {_kind(spec)}")
        if "same_as" in spec:
            other = spec["same_as"]
            if not isinstance(other, str) or other not in self.modules:
                raise HardenError(f"{where}: same_as names unknown module {other!r}")
            self.modules[path] = self.modules[other]
            return self.modules[other]
        class_name = _field(spec, "class", str, where)
        cls = _nn_class(class_name)
        if cls is None:
            raise HardenError(
                f"{where}: class {class_name!r} is not a torch.nn module; a harden graph file loads only torch.nn modules"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name, value in _pairs(spec, "attributes", where):
            self._plain_attribute(module, name, where)
            object.__setattr__(module, name, _decode(value, f"{where} attribute {name!r}", None))
        self.modules[path] = module
        self.module_into(module, spec, path)
        return module

    @staticmethod
    def _plain_attribute(module: nn.Module, name: str, where: str) -> None:
        if (not _IDENT.match(name) or name.startswith("__") or name in _MODULE_INTERNALS or name == "training"
                or hasattr(type(module), name) or name in module.__dict__):
            raise HardenError(f"{where}: refused attribute name {name!r}")

    def tensor(self, entry: Any, qualname: str, parameter: bool, where: str) -> torch.Tensor | None:
        if entry is None:
            return None
        where = f"{where} tensor {qualname!r}"
        if isinstance(entry, dict) and "same_as" in entry:
            other = entry["same_as"]
            if not isinstance(other, str) or other not in self.tensors:
                raise HardenError(f"{where}: same_as names unknown tensor {other!r}")
            tensor = self.tensors[other]
            if isinstance(tensor, nn.Parameter) != parameter:
                raise HardenError(f"{where}: same_as {other!r} is a {'buffer' if parameter else 'parameter'}")
            self.tensors[qualname] = tensor
            return tensor
        dtype = _torch_dtype(_field(entry, "dtype", str, where), where)
        shape = _field(entry, "shape", list, where)
        requires_grad = _field(entry, "requires_grad", bool, where)
        if not all(type(s) is int and s >= 0 for s in shape):
            raise HardenError(f"{where}: malformed shape {shape!r:.60}")
        self.elements += check_elements(shape, where)
        if self.elements > MAX_TOTAL_ELEMENTS:
            raise HardenError(f"{where}: the graph's tensors exceed {MAX_TOTAL_ELEMENTS:,} elements together")
        if qualname not in self.arrays:
            raise HardenError(f"graph file: missing array for tensor {qualname!r}")
        array = self.arrays[qualname]
        if not isinstance(array, np.ndarray):
            raise HardenError(f"graph file: array {qualname!r} is a {_kind(array)}, not a numpy array")
        storage = _torch_dtype(entry["bits"], where) if "bits" in entry else dtype
        expected = torch.empty(0, dtype=storage, device="cpu").numpy().dtype
        if array.dtype != expected or list(array.shape) != shape:
            raise HardenError(
                f"graph file: array {qualname!r} is {array.dtype}{list(array.shape)}, expected {expected}{shape}"
            )
        tensor = torch.from_numpy(array.copy())
        if storage is not dtype:
            tensor = tensor.view(dtype)
        if parameter:
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        elif requires_grad:
            tensor.requires_grad_(True)
        self.tensors[qualname] = tensor
        return tensor


def _build_graph(nodes_spec: list, gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    methods = allowed_methods()
    for index, spec in enumerate(nodes_spec):
        where = f"graph file node #{index}"
        name = _field(spec, "name", str, where)
        if not _IDENT.match(name) or keyword.iskeyword(name):
            raise HardenError(f"{where}: invalid node name {name!r}")
        if name in nodes:
            raise HardenError(f"{where}: duplicate node name {name!r}")
        where = f"graph node {name!r}"
        op = _field(spec, "op", str, where)
        if op not in _OPS:
            raise HardenError(f"{where}: unknown op {op!r}")
        target = spec.get("target") if isinstance(spec, dict) else None
        if op == "placeholder":
            if not isinstance(target, str) or not _IDENT.match(target) or keyword.iskeyword(target):
                raise HardenError(f"{where}: invalid placeholder name {target!r}")
        elif op == "output":
            if target != "output":
                raise HardenError(f"{where}: invalid output target {target!r}")
        elif op in ("get_attr", "call_module"):
            target = _check_path(target, where)
        elif op == "call_method":
            if target not in methods:
                raise HardenError(f"{where} calls Tensor.{target}, which is not an allowed tensor method")
        else:
            target = _resolve_function(target, name)
        # A placeholder's only argument is its default value, a literal rendered into forward's signature.
        visible = None if op == "placeholder" else nodes
        args = _field(spec, "args", list, where)
        args = tuple(_decode(a, where, visible) for a in args)
        kwargs = {}
        for key, value in _pairs(spec, "kwargs", where):
            if not _IDENT.match(key) or keyword.iskeyword(key):
                raise HardenError(f"{where}: invalid keyword argument name {key!r}")
            kwargs[key] = _decode(value, where, visible)
        expected = {"placeholder": (0, 1), "get_attr": (0, 0), "output": (1, 1)}.get(op)
        if expected and (kwargs or not expected[0] <= len(args) <= expected[1]):
            raise HardenError(f"{where}: malformed arguments for a {op} node")
        if target is getattr:
            _check_getattr(name, args, kwargs)
        if isinstance(target, torch._ops.OpOverload):
            check_aten_call(target, args, kwargs, name)
        if op == "get_attr" and not isinstance(_resolve_attr(gm, target), torch.Tensor):
            raise HardenError(f"{where}: get_attr target {target!r} is not a tensor of the graph file")
        if op == "call_module":
            module = _resolve_attr(gm, target)
            if not isinstance(module, nn.Module) or type(module) is nn.Module:
                raise HardenError(f"{where}: call_module target {target!r} is not a stored leaf module")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise HardenError(f"{where}: the name cannot be kept (fx renames it to {node.name!r})")
        nodes[name] = node
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(outputs) != 1 or outputs[0] is not list(graph.nodes)[-1]:
        raise HardenError("graph file: the graph must end with exactly one output node")
    return graph


def _resolve_attr(gm: nn.Module, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        if isinstance(value, nn.Module) and atom in value._modules:
            value = value._modules[atom]
        elif isinstance(value, nn.Module) and atom in value._parameters:
            value = value._parameters[atom]
        elif isinstance(value, nn.Module) and atom in value._buffers:
            value = value._buffers[atom]
        elif isinstance(value, nn.Module) and isinstance(value.__dict__.get(atom), torch.Tensor):
            value = value.__dict__[atom]
        else:
            return None
    return value


def _load(doc: Any, arrays: Any) -> fx.GraphModule:
    where = "graph file"
    if not isinstance(doc, dict):
        raise HardenError(f"{where}: expected a JSON object, got {_kind(doc)}")
    version = doc.get("format")
    if version != FORMAT or isinstance(version, bool):
        raise HardenError(f"{where}: unsupported format version {version!r} (this harden reads version {FORMAT})")
    if doc.get("kind") != KIND:
        raise HardenError(f"{where}: not a harden graph document (kind {doc.get('kind')!r})")
    class_name = _field(doc, "class_name", str, where)
    if not _IDENT.match(class_name):
        raise HardenError(f"{where}: invalid class name {class_name!r}")
    root_spec = _field(doc, "root", dict, where)
    nodes_spec = _field(doc, "nodes", list, where)

    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name)
    _Loader(arrays).module_into(gm, root_spec, "")
    graph = _build_graph(nodes_spec, gm)  # every string reaching generated code is validated here
    gm.graph = graph  # recompiles forward
    try:
        graph.lint()
    except Exception as exc:  # fx raises RuntimeError/AssertionError for malformed graphs
        raise HardenError(f"{where}: invalid graph: {_one_line(exc)}") from None
    return gm


def graph_from_json(doc: dict, arrays: dict[str, np.ndarray]) -> fx.GraphModule:
    """Rebuild the GraphModule :func:`graph_to_json` described; refuses anything outside the allowlists."""
    try:
        return _load(doc, arrays)
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed file is one line, never a traceback
        raise HardenError(f"graph file: malformed document ({type(exc).__name__}: {_one_line(exc)})") from None
