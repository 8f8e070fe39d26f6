"""The package's map: stages in folders, data flowing one way (no module imports a later stage)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harden"

# Earliest first; a module may import its own stage and earlier ones, never a later one.  The instrument
# stage spans methods, their training, the detectors they fit and the pipeline that assembles them.
STAGES = [
    {"harden.errors", "harden.core"},
    {"harden.io"},
    {"harden.graph"},
    {"harden.bounds"},
    {"harden.attacks"},
    {"harden.detectors", "harden.train", "harden.methods", "harden.instrumentation"},
    {"harden.bundle"},
    {"harden.export"},
    {"harden.certification", "harden.evaluation"},
    {"harden.report"},
    {"harden.api", "harden"},
    {"harden.cli"},
    {"harden.examples"},   # a user's model and training script: may use anything
]
ROOT_MODULES = {"__init__.py", "api.py", "errors.py"}


def _stage(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "harden":   # from harden import api -> harden.api
                found += [(node.lineno, f"harden.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "harden" or name.startswith("harden.")]


def test_package_root_holds_only_the_public_api():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
    assert loose == [], f"modules outside a stage folder: {loose}"


def test_every_module_belongs_to_a_stage():
    orphans = [_module_name(p) for p in PACKAGE.rglob("*.py") if _stage(_module_name(p)) is None]
    assert orphans == []


def test_no_module_imports_a_later_stage():
    backward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        for line, target in _imports(path):
            if target in ("harden",):
                continue
            if _stage(target) > _stage(here):
                backward.append(f"{here}:{line} imports {target}")
    assert backward == [], "\n".join(backward)
