"""Recipes: everything that makes a bundle except the model and the key, as a TOML file.

    data = "mnist"
    fpr = 0.02
    policy = "any"

    [methods.ctt-strict]
    eps = "auto"

    [methods.safetynet]
    layers = "all"
    code = "quaternary"

``harden instrument MODEL --recipe hardening.toml`` reads one (flags given on
the command line win over it); every bundle records the recipe that made it,
all options resolved (``harden inspect BUNDLE --recipe`` prints it as TOML),
so instrumenting again from that recipe, with the same model and key, makes
the same bundle.  The key never appears in a recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harden.errors import HardenError
from harden.io.data import Dataset
from harden.methods.base import METHODS, MethodSpec, Options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The settings a recipe may hold besides its methods, with the type each must have.
SHARED = {"data": str, "input_range": (str, list), "limit": int, "seed": int, "fpr": float,
          "fpr_confidence": float, "policy": str, "device": str, "finetune": str}


@dataclass
class Recipe:
    """Shared settings by name (only those given) and the methods in order, with their options as given."""

    shared: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def specs(self) -> list[MethodSpec]:
        return [MethodSpec.of(name, **options) for name, options in self.methods.items()]

    def with_methods(self, texts: Sequence[str]) -> "Recipe":
        """The recipe with ``--method`` texts added: a method it has already takes their options on top of its own."""
        from harden.core.options import split_spec

        methods = {name: dict(options) for name, options in self.methods.items()}
        for text in texts:
            name, given = split_spec(text, "method")
            name = METHODS.get(name).name
            methods[name] = {**methods.get(name, {}), **given}
        return Recipe(dict(self.shared), methods)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file, checked: known settings of the right type, known methods with valid options."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HardenError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HardenError(f"cannot read recipe {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HardenError(f"recipe {path} is not valid TOML: {exc}") from None
    return recipe_from_dict(document, f"recipe {path.name}")


def recipe_from_dict(document: dict[str, Any], where: str = "recipe") -> Recipe:
    unknown = sorted(set(document) - set(SHARED) - {"methods"})
    if unknown:
        raise HardenError(f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join([*SHARED, 'methods'])} "
                          "(the key is never part of a recipe: give --key)")
    shared = {}
    for name, kind in SHARED.items():
        if name not in document or document[name] is None:
            continue
        value = document[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise HardenError(f"{where}: {name} = {value!r} has the wrong type")
        shared[name] = value
    methods = document.get("methods", {})
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise HardenError(f"{where}: methods must be tables, e.g. [methods.ctt-strict]")
    recipe = Recipe(shared, {METHODS.get(name).name: dict(options) for name, options in methods.items()})
    recipe.specs()   # every method's options checked now, before any work
    return recipe


def recipe_of(data: Dataset, specs: Sequence[MethodSpec], options: Options, policy: str,
              finetune: str | None = None) -> dict[str, Any]:
    """What made a bundle (for its manifest): shared settings and every method's options, all resolved
    (``finetune``: the fine-tuning objective's text with every option, when one ran)."""
    return {
        "data": data.name,
        "input_range": list(data.input_range),
        "limit": data.split.get("limit"),
        "seed": options.seed,
        "fpr": options.fpr,
        "fpr_confidence": options.fpr_confidence,
        "policy": policy,
        "device": options.device,
        **({"finetune": finetune} if finetune else {}),
        "methods": {s.name: s.settings.to_dict() for s in specs},
    }


def to_toml(recipe: dict[str, Any]) -> str:
    """A manifest's recipe as a recipe file (None, which TOML cannot say, is written "none")."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in recipe.items() if k != "methods" and v is not None]
    for name, options in recipe.get("methods", {}).items():
        lines += ["", f"[methods.{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'

