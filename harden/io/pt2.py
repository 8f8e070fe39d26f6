"""Loading a ``torch.export`` program (``.pt2``) without running code from the file.

``torch.export.load`` trusts its file: it unpickles sample inputs and some weights (and falls back to
``weights_only=False`` when the safe unpickler refuses), evaluates shape expressions with
``sympy.sympify`` (Python's ``eval``), turns ``guards_code`` into Python source, resolves any
``torch.*`` attribute path named as a node target (``torch.os.system`` included), unpickles opaque
constants with plain ``pickle`` and loads AOTInductor shared libraries.  So harden reads the archive
itself first (:func:`check_program`) and lets torch see it only when every part is plain data:

- only the members a program needs (no ``data/aotinductor``, executorch, opaque or custom objects);
- every pickle names only tensor and container globals (:mod:`harden.io.pickles`);
- every node target is an ATen overload of ``harden.core.aten_ops.ATEN_OPS`` (or its in-place twin in
  ``INPLACE_ATEN_OPS``, rewritten out of place at load) or a listed Python operator;
- every shape expression is spelled with sympy's constructors only (no attribute, no other name);
- no guard code; every stated tensor size within :mod:`harden.core.limits`.

Then :func:`load_program` loads the very bytes it checked (read once, no second look at the path), with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set so that no unpickling inside torch can fall back to
``weights_only=False``, and torch's log records captured rather than printed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from harden.core.aten_ops import ATEN_OPS, INPLACE_ATEN_OPS
from harden.core.limits import MAX_MEMBER_BYTES, MAX_TOTAL_ELEMENTS, check_elements
from harden.errors import HardenError
from harden.io.pickles import check_torch_archive
from harden.io.safezip import SafeZip

_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_MODEL = re.compile(rf"^models/({_NAME})\.json$")
_SAMPLE_INPUTS = re.compile(rf"^data/sample_inputs/({_NAME})\.pt$")
_WEIGHTS_CONFIG = re.compile(rf"^data/weights/({_NAME})_weights_config\.json$")
_CONSTANTS_CONFIG = re.compile(rf"^data/constants/({_NAME})_constants_config\.json$")
_PAYLOAD = re.compile(rf"^data/(weights|constants)/({_NAME})$")
_EXTRA = re.compile(rf"^extra/{_NAME}$")

# Python callables torch.export writes as node targets for shape arithmetic on a dynamic batch.
OPERATOR_TARGETS = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.pow", "_operator.eq", "_operator.ne",
    "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge", "_operator.and_", "_operator.or_",
    "torch.sym_float", "torch.sym_int", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_ite",
    "torch.sym_sqrt", "math.ceil", "math.floor", "math.trunc",
})
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")

# The words a serialized shape expression (sympy's srepr) may use: sympy's and torch's constructors and the
# assumptions Symbol takes.  No attribute access and no other name, so sympify's eval cannot reach Python.
SYMPY_NAMES = frozenset({
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "Eq",
    "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "NaN", "Zero", "One", "NegativeOne", "Half", "int_oo", "IntInfinity",
    "NegativeIntInfinity", "Piecewise", "ExprCondPair", "floor", "ceiling", "sqrt", "sign",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "even", "odd", "prime", "rational", "extended_real", "commutative", "precision",
})
_EXPR_TOKEN = re.compile(
    r"\s+|'[A-Za-z_][A-Za-z0-9_]*'|'[-+]?[0-9.]+(?:e[-+]?[0-9]+)?'|[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?"
    r"|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~]"
)
_SYMBOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_EXPR_LENGTH = 4096


def check_sym_expr(text: Any, where: str) -> None:
    """Refuse a shape expression that is not sympy constructors, numbers, quoted names and arithmetic."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_LENGTH:
        raise HardenError(f"{where}: malformed shape expression {text!r:.80}")
    position = 0
    while position < len(text):
        match = _EXPR_TOKEN.match(text, position)
        if match is None:
            raise HardenError(f"{where}: shape expression {text!r:.80} has {text[position:position + 12]!r}, "
                              "which is not sympy arithmetic; harden does not evaluate it")
        token = match.group(0)
        if token[0].isalpha() or token[0] == "_":
            if token not in SYMPY_NAMES:
                raise HardenError(f"{where}: shape expression {text!r:.80} names {token!r}, which is not a sympy "
                                  "constructor; harden does not evaluate it")
        position = match.end()


def _check_target(target: Any, where: str) -> None:
    if not isinstance(target, str):
        raise HardenError(f"{where}: malformed node target {target!r:.80}")
    if target in OPERATOR_TARGETS:
        return
    match = _ATEN_TARGET.match(target)
    if match is None:
        raise HardenError(f"{where} calls {target!r:.80}, which is not an ATen op; harden loads programs of ATen ops "
                          "only (no Python functions, higher-order or custom ops)")
    if f"aten.{match.group(1)}.{match.group(2)}" not in ATEN_OPS | INPLACE_ATEN_OPS:
        raise HardenError(f"{where} calls {target!r:.80}, which is not in harden's ATen allowlist "
                          "(harden.core.aten_ops.ATEN_OPS)")


def _walk(value: Any, where: str) -> None:
    """Every part of a program document that torch would resolve by name or evaluate."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str":
                check_sym_expr(item, where)
            elif key == "as_operator":
                _check_target(item, where)
            elif key in ("as_custom_obj", "as_custom_objs", "as_graph") and item is not None:
                raise HardenError(f"{where}: holds a {key[3:]} argument, which harden does not load")
            elif key == "custom_obj_values" and item:
                raise HardenError(f"{where}: holds custom (TorchScript) objects, which harden does not load")
            if key == "nodes" and isinstance(item, list):
                for node in item:
                    name = node.get("name") if isinstance(node, dict) else None
                    _check_target(node.get("target") if isinstance(node, dict) else None,
                                  f"{where} node {name!r:.60}")
            _walk(item, where)
    elif isinstance(value, list):
        for item in value:
            _walk(item, where)


def _check_program_json(doc: Any, where: str) -> None:
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise HardenError(f"{where} is not a torch.export program document")
    if doc.get("guards_code"):
        raise HardenError(f"{where} holds guard code (Python source torch would run); harden does not load it. "
                          "Export without custom guards")
    constraints = doc.get("range_constraints", {})
    if not isinstance(constraints, dict) or not all(isinstance(k, str) and _SYMBOL_NAME.match(k) for k in constraints):
        raise HardenError(f"{where}: malformed range constraints")
    _walk(doc, where)


def _check_tensor_meta(meta: Any, where: str) -> int:
    if not isinstance(meta, dict) or not isinstance(meta.get("sizes"), list):
        raise HardenError(f"{where}: malformed tensor description")
    sizes = []
    for size in meta["sizes"]:
        value = size.get("as_int") if isinstance(size, dict) else None
        if type(value) is not int:
            raise HardenError(f"{where}: a stored tensor has a size that is not a number")
        sizes.append(value)
    return check_elements(sizes, where)


def _check_payload_config(archive: SafeZip, root: str, name: str, kind: str, where: str) -> set[str]:
    """The members a weights/constants config names; pickled ones must hold tensors only."""
    doc = archive.read_json(root + name)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise HardenError(f"{where}: {name} is malformed")
    members, total = set(), 0
    for fqn, entry in config.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise HardenError(f"{where}: {name}: malformed entry {fqn!r:.60}")
        path_name = entry["path_name"]
        member = f"data/{kind}/{path_name}"
        if not re.fullmatch(_NAME, path_name) or root + member not in archive:
            raise HardenError(f"{where}: {name} names {path_name!r:.60}, which the archive does not hold")
        if kind == "constants" and not path_name.startswith("tensor_"):
            raise HardenError(f"{where}: constant {fqn!r:.60} is a Python or TorchScript object ({path_name}); "
                              "harden loads tensor constants only")
        if entry.get("use_pickle"):
            check_torch_archive(archive.read(root + member), f"{where}: {member}")
        else:
            total += _check_tensor_meta(entry.get("tensor_meta"), f"{where}: {member}")
        members.add(member)
    if total > MAX_TOTAL_ELEMENTS:
        raise HardenError(f"{where}: its {kind} hold {total:,} elements, above the cap of {MAX_TOTAL_ELEMENTS:,}")
    return members


def check_program(data: bytes, where: str) -> None:
    """Refuse, in one line, any part of a .pt2 archive that loading could execute or that exceeds the caps."""
    archive = SafeZip(data, where)
    names = archive.names()
    if not names:
        raise HardenError(f"{where} is an empty archive")
    root = names[0].split("/", 1)[0] + "/"
    relative = []
    for name in names:
        if not name.startswith(root) or name.endswith("/") and name != root:
            raise HardenError(f"{where}: member {name!r:.80} lies outside the archive's folder {root!r}")
        if name != root:
            relative.append(name[len(root):])
    if root + "archive_format" not in archive or archive.read(root + "archive_format", 64).strip() != b"pt2":
        raise HardenError(f"{where} is not a torch.export archive (archive_format is not pt2); export the model "
                          "with torch.export.save in torch >= 2.7")
    models = [m.group(1) for m in map(_MODEL.match, relative) if m]
    if models != ["model"]:
        raise HardenError(f"{where} holds programs {models}; harden loads one program named 'model'")
    payloads = set()
    for name in relative:
        if name in _FIXED or _MODEL.match(name) or _EXTRA.match(name):
            continue
        if _SAMPLE_INPUTS.match(name):
            check_torch_archive(archive.read(root + name), f"{where}: {name}")
            continue
        config = _WEIGHTS_CONFIG.match(name) or _CONSTANTS_CONFIG.match(name)
        if config:
            kind = "weights" if name.startswith("data/weights/") else "constants"
            payloads |= _check_payload_config(archive, root, name, kind, where)
            continue
        if _PAYLOAD.match(name):
            continue  # checked through its config below
        raise HardenError(f"{where} holds {name!r:.80}, which harden does not load (compiled code, legacy or "
                          "unknown parts); export the model with torch.export.save")
    stray = {n for n in relative if _PAYLOAD.match(n) and not _WEIGHTS_CONFIG.match(n)
             and not _CONSTANTS_CONFIG.match(n)} - payloads
    if stray:
        raise HardenError(f"{where} holds {sorted(stray)[0]!r}, which no weights or constants config names")
    for name in ("data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
                 "data/constants/model_constants_config.json"):
        if name not in relative:
            raise HardenError(f"{where} is incomplete: it has no {name}")
    _check_program_json(archive.read_json(root + "models/model.json"), f"{where}: models/model.json")


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is still not worth a traceback
            self.messages.append(str(record.msg))


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[_Captured]:
    """torch's log records (tracebacks included) go to a list instead of stderr while the block runs."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    loggers.append(logging.getLogger("torch"))
    captured = _Captured()
    saved = [(lg, lg.propagate, lg.handlers[:], lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers = [captured]
        lg.propagate = False
    try:
        yield captured
    finally:
        for lg, propagate, handlers, level in saved:
            lg.handlers, lg.propagate, lg.level = handlers, propagate, level


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """Every torch.load inside the block unpickles with weights_only=True, whatever its caller asks."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_program(path: Path):
    """The checked program as a torch ExportedProgram; a HardenError naming what was refused otherwise."""
    where = str(path)
    size = path.stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise HardenError(f"{where} is {size:,} bytes, above the cap of {MAX_MEMBER_BYTES:,}")
    data = path.read_bytes()
    check_program(data, where)
    with quiet_torch_logs() as logs, _weights_only_everywhere():
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged program
            reason = _first_line(str(exc)) or next((m for m in logs.messages if m.strip()), "") or type(exc).__name__
            raise HardenError(f"{where} is not a loadable torch.export program: {_first_line(reason)[:300]}") from None


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""
