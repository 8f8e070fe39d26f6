"""Model loading, safe by default (design section 2).

- ``model.pt2``: a ``torch.export`` ExportedProgram, checked part by part before torch reads it
  (:mod:`harden.io.pt2`): nothing in the file is unpickled beyond tensors, evaluated or imported.
- ``model.pt`` holding a state_dict, with ``arch="package.module:factory"``:
  loaded with ``weights_only=True``.
- ``model.pt`` holding a whole pickled module: refused unless ``trust_pickle``,
  because unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from harden.core.inplace import needs_functionalisation
from harden.errors import HardenError


def _import_factory(arch: str):
    """Import the user's factory: by design this runs the named module's code (docs/SECURITY.md).

    The working folder is searched LAST, after the installed packages: a folder that happens to hold an
    ``examples/`` or ``harden/`` (or a module named like any dependency harden imports later) cannot
    stand in for the installed one.  A module that exists only in the working folder is still found.
    """
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise HardenError(f"--arch {arch!r} must look like package.module:factory")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise HardenError(f"--arch {arch!r}: {module_name!r} is not a dotted module name")
    working = os.getcwd()
    if not any(entry in ("", ".", working) for entry in sys.path):
        sys.path.append(working)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HardenError(f"--arch: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing: its problem, stated in one line
        raise HardenError(f"--arch: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise HardenError(f"--arch: {module_name!r} has no {attr!r}") from None
    if not callable(factory):
        raise HardenError(f"--arch: {arch!r} is not callable")
    return factory


def _load_exported(path: Path) -> nn.Module:
    from harden.io.pt2 import load_program, quiet_torch_logs

    program = load_program(path)
    _check_dynamic_batch(program, path)
    if needs_functionalisation(program.graph):
        program = _functional(program, path)
    with quiet_torch_logs():
        try:
            return program.module()
        except Exception as exc:  # noqa: BLE001 - torch raises many types for an inconsistent program
            raise HardenError(f"{path}: torch cannot rebuild the program's module: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _functional(program, path: Path):
    """The program without in-place ops whose rename would change what they compute (a fill_ of a slice whose
    base is read later): torch.export's functionalisation rewrites each mutation as the value it produces; no
    op is decomposed further.  (Other in-place ops, hardswish_ or silu_, are renamed at trace time.)"""
    from harden.io.pt2 import quiet_torch_logs

    try:
        with quiet_torch_logs():
            return program.run_decompositions({})
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise HardenError(f"{path}: its in-place ops cannot be rewritten out of place by torch.export: "
                          f"{_first_line(exc)}") from None


def _check_dynamic_batch(program, path: Path) -> None:
    """A program exported with a fixed batch size bakes it into reshapes; it would fail on other batches."""
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = next((n for n in program.graph.nodes if n.name == getattr(spec.arg, "name", None)), None)
        if node is None:
            raise HardenError(f"{path}: the program's signature names an input its graph does not have")
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is not None and len(shape) > 0 and isinstance(shape[0], int):
            raise HardenError(
                f"{path} was exported with a fixed batch size of {shape[0]}; export it with "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}} so any batch size works"
            )


def _load_state_dict(path: Path, arch: str) -> nn.Module:
    factory = _import_factory(arch)
    try:
        model = factory()
    except Exception as exc:
        raise HardenError(f"--arch {arch!r}: calling the factory failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise HardenError(f"--arch {arch!r} did not return a torch.nn.Module")
    state = _torch_load(path, weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HardenError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HardenError(f"{path} does not fit --arch {arch!r}: {str(exc).splitlines()[0]}") from None
    return model


def _torch_load(path: Path, weights_only: bool):
    if zipfile.is_zipfile(path):
        from harden.io.safezip import SafeZip

        SafeZip(path, str(path)).close()  # sizes and compression ratios within the caps before torch reads it
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise HardenError(
                f"{path} holds pickled Python objects, not only tensors; loading it would run code from the "
                "file. Save a state_dict and pass --arch, export with torch.export (.pt2), or pass "
                "--trust-pickle if you trust the file"
            ) from None
        raise HardenError(f"{path} cannot be unpickled: {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, MemoryError) as exc:
        raise HardenError(f"{path} is not a readable torch file: {_first_line(exc)}") from None


def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """The classifier in eval mode, loaded without running code from the file unless trusted."""
    path = Path(path)
    if not path.is_file():
        raise HardenError(f"no model file at {path}")
    if path.suffix == ".pt2":
        return _load_exported(path)
    if arch:
        return _load_state_dict(path, arch).eval()
    content = _torch_load(path, weights_only=not trust_pickle)
    if isinstance(content, nn.Module):
        return content.eval()
    if isinstance(content, dict):
        raise HardenError(f"{path} holds a state_dict; name its architecture with --arch package.module:factory")
    raise HardenError(f"{path} holds a {type(content).__name__}, not a model")
