"""Importing this module registers every built-in method (each module of harden.methods registers itself)."""

import importlib
import pkgutil

import harden.methods as _package

_SKIP = {"base", "load_all"}
for _info in pkgutil.iter_modules(_package.__path__):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"harden.methods.{_info.name}")
