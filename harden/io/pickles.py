"""Which Python globals a pickle would call, found without unpickling it, checked against an allowlist.

Unpickling runs whatever callables the pickle names (its GLOBAL / STACK_GLOBAL opcodes); everything
else it does is build containers and call those callables.  :func:`pickle_globals` reads the opcode
stream with ``pickletools`` and tracks just enough of the unpickler's stack to know the module and name
behind every STACK_GLOBAL; a name it cannot determine statically is refused rather than guessed.
:func:`check_torch_archive` applies that to every pickle inside a ``torch.save`` archive: only the
callables that rebuild tensors, storages and plain containers may appear (``TENSOR_GLOBALS``).
"""

from __future__ import annotations

import pickletools

from harden.errors import HardenError
from harden.io.safezip import SafeZip

# What torch.save writes for tensors, parameters and the containers and primitives around them.
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
             "ComplexFloat", "ComplexDouble")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "uint16", "uint32", "uint64")
TENSOR_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "collections.OrderedDict",
    "torch.storage.UntypedStorage",
    "torch.Size",
    "torch.device",
    *(f"torch.{kind}Storage" for kind in _STORAGES),
    *(f"torch.{dtype}" for dtype in _DTYPES),
})

_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                      "SHORT_BINSTRING"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# Extension codes name globals through copyreg's process-wide registry, which a file cannot be checked against.
_REFUSED = frozenset({"EXT1", "EXT2", "EXT4"})


class _Opaque:
    """A stack value whose content does not matter (anything but a string that may name a global)."""


_OPAQUE = _Opaque()
_MARK = object()


def pickle_globals(data: bytes, where: str) -> list[str]:
    """Every ``module.name`` the pickle would look up, in order; a HardenError if that cannot be known."""
    found: list[str] = []
    stack: list = []
    memo: dict = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _REFUSED:
                raise HardenError(f"{where}: the pickle uses extension opcode {name}, which harden refuses")
            if name in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                found.append(f"{module}.{qualname}")
            if name == "STACK_GLOBAL":
                if len(stack) < 2:
                    raise HardenError(f"{where}: malformed pickle (STACK_GLOBAL on a short stack)")
                qualname, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(qualname, str)):
                    raise HardenError(f"{where}: the pickle computes the name of a global it calls; harden refuses it")
                found.append(f"{module}.{qualname}")
                stack.append(_OPAQUE)
                continue
            if name in _STRINGS:
                stack.append(arg if isinstance(arg, str) else _OPAQUE)
                continue
            if name in _PUTS:
                memo[arg] = stack[-1] if stack else _OPAQUE
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _OPAQUE
                continue
            if name in _GETS:
                stack.append(memo.get(arg, _OPAQUE))
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else _OPAQUE)
                continue
            _generic(opcode, stack, where)
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and others on damaged streams
        raise HardenError(f"{where}: not a readable pickle ({type(exc).__name__}: {str(exc)[:120]})") from None
    return found


def _generic(opcode, stack: list, where: str) -> None:
    before = list(opcode.stack_before)
    if pickletools.markobject in before:
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if not stack:
            raise HardenError(f"{where}: malformed pickle (no mark for {opcode.name})")
        stack.pop()
        extra = before.index(pickletools.markobject)
    else:
        extra = len(before)
    for _ in range(extra):
        if not stack:
            raise HardenError(f"{where}: malformed pickle (stack underflow at {opcode.name})")
        stack.pop()
    for item in opcode.stack_after:
        stack.append(_MARK if item is pickletools.markobject else _OPAQUE)


def check_pickle(data: bytes, where: str, allowed: frozenset[str] = TENSOR_GLOBALS) -> None:
    """Refuse, in one line, a pickle that names any global outside ``allowed``."""
    for name in pickle_globals(data, where):
        if name not in allowed:
            raise HardenError(
                f"{where} names the Python global {name!r}, which is not a tensor or a plain value; loading it "
                "would run code from the file, so harden refuses it"
            )


def check_torch_archive(data: bytes, where: str) -> None:
    """A ``torch.save`` zip archive whose every pickle names only tensor and container globals."""
    archive = SafeZip(data, where)
    pickles = [name for name in archive.names() if name.endswith(".pkl")]
    if not pickles:
        raise HardenError(f"{where} is not a torch.save archive (no data.pkl)")
    for name in pickles:
        check_pickle(archive.read(name), f"{where} ({name.rsplit('/', 1)[-1]})")
