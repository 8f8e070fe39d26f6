"""Typed options, written ``name:key=value,key=value`` on the command line: attacks and methods both take them.

A :class:`Param` knows its type, default, help and valid range, and turns
text (or a Python value, or a recipe file's TOML value) into a checked value;
a bad one is one :class:`~harden.errors.HardenError` line naming the owner
and, for an unknown key, every valid one.  Methods declare their options as a
dataclass of :func:`option` fields (:class:`OptionSet`); attacks list Params.

Values that hold commas go in brackets: ``layers=[relu1,relu2]``.  A list
option takes ``+``-separated items: ``attacks=fgsm:eps=auto+[pgd:eps=0.1,steps=20]``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from harden.errors import HardenError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "default")


def format_value(value: Any) -> str:
    """How a value reads in ``key=value`` text (``parse`` of it gives the value back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (tuple, list)):
        return "+".join(_bracketed(format_value(v)) for v in value)
    return "none" if value is None else str(value)


def _bracketed(text: str) -> str:
    return f"[{text}]" if any(c in text for c in ",+") else text


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets; each part stripped of one pair of enclosing brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HardenError(f"{text!r}: a ']' closes no '['")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise HardenError(f"{text!r}: a '[' is never closed")
    parts.append("".join(current))
    return [_unbracket(p.strip()) for p in parts]


def _unbracket(text: str) -> str:
    """``[a,b]`` -> ``a,b``; ``[a]+[b]`` stays (its first bracket closes before the end)."""
    if not (text.startswith("[") and text.endswith("]")):
        return text
    depth = 0
    for i, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if depth == 0:
            return text[1:-1].strip() if i == len(text) - 1 else text
    return text


def split_spec(text: str, what: str) -> tuple[str, dict[str, str]]:
    """``name`` or ``name:key=value,...`` -> (name, {key: raw text}); a key given twice is an error."""
    if not isinstance(text, str) or not text.strip():
        raise HardenError(f"empty {what}; write name or name:key=value,...")
    name, sep, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise HardenError(f"{what} {text!r} has no name; write name or name:key=value,...")
    given: dict[str, str] = {}
    if sep:
        if not rest.strip():
            raise HardenError(f"{what} {text!r}: nothing after ':'; write {name}:key=value,...")
        for item in split_top(rest, ","):
            key, eq, raw = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not eq or not key or not raw.strip():
                raise HardenError(f"{what} {text!r}: {item.strip()!r} is not key=value")
            if key in given:
                raise HardenError(f"{what} {text!r}: {key} is given twice")
            given[key] = _unbracket(raw.strip())
    return name, given


@dataclass(frozen=True)
class Param:
    """One option: its type, default (a value, or a function of the other resolved values) and valid range."""

    name: str
    kind: type                       # float, int, str or bool (of each item, for a list)
    default: Any
    doc: str
    minimum: float | None = None
    strict: bool = False             # value must be > minimum rather than >=
    maximum: float | None = None     # inclusive
    choices: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()   # words a number option also accepts (e.g. eps=auto)
    optional: bool = False           # None ("none") is a value
    many: bool = False               # a tuple of items of ``kind``
    default_text: str | None = None  # how a computed default reads in help

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return "computed" if callable(self.default) else format_value(self.default)

    def describe_kind(self) -> str:
        if self.choices:
            kind = "|".join(self.choices)
        else:
            kind = "|".join((self.kind.__name__, *self.keywords))
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.strict else '>='} {format_value(self.minimum)}")
        if self.maximum is not None:
            bounds.append(f"<= {format_value(self.maximum)}")
        text = kind + (f" ({', '.join(bounds)})" if bounds else "")
        if self.many:
            text = f"list of {text}, joined by +"
        return text + (" or none" if self.optional else "")

    def convert(self, owner: str, raw: Any) -> Any:
        """A checked value from text, a Python value or a recipe's TOML value."""
        if self.optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE)):
            return None
        if self.many:
            items = split_top(raw, "+") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
            items = [i for i in items if not (isinstance(i, str) and not i.strip())]
            if not items:
                raise HardenError(f"{owner}: {self.name} needs at least one item")
            return tuple(self._one(owner, i) for i in items)
        return self._one(owner, raw)

    def _one(self, owner: str, raw: Any) -> Any:
        where = f"{owner}: {self.name}"
        if self.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise HardenError(f"{where}={raw!r} is not true or false")
        if self.kind is str:
            if not isinstance(raw, str):
                raise HardenError(f"{where}={raw!r} must be text")
            value = raw.strip()
            if self.choices and value.lower() not in self.choices:
                raise HardenError(f"{where}={value!r} is not one of {', '.join(self.choices)}")
            if not value:
                raise HardenError(f"{where} is empty")
            return value.lower() if self.choices else value
        if isinstance(raw, str) and raw.strip().lower() in self.keywords:
            return raw.strip().lower()
        if isinstance(raw, bool):
            raise HardenError(f"{where} must be a number, not {raw!r}")
        try:
            number = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            words = f", {', '.join(self.keywords)}" if self.keywords else ""
            raise HardenError(f"{where}={raw!r} is not a number{words}") from None
        if not math.isfinite(number):
            raise HardenError(f"{where}={raw!r} must be finite")
        if self.kind is int:
            if not number.is_integer():
                raise HardenError(f"{where}={raw!r} must be a whole number")
            value: Any = int(number)
        else:
            value = number
        if self.minimum is not None and (value <= self.minimum if self.strict else value < self.minimum):
            raise HardenError(f"{where}={raw!r} must be {'>' if self.strict else '>='} {format_value(self.minimum)}")
        if self.maximum is not None and value > self.maximum:
            raise HardenError(f"{where}={raw!r} must be <= {format_value(self.maximum)}")
        return value


def find_param(params: tuple[Param, ...], owner: str, name: str) -> Param:
    for p in params:
        if p.name == name:
            return p
    raise HardenError(f"{owner} has no option {name!r}; valid: {', '.join(p.name for p in params) or 'none'}")


def resolve(params: tuple[Param, ...], owner: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option, defaults filled in (plain ones first, then those computed from the others), all checked."""
    values = {name: find_param(params, owner, name).convert(owner, raw) for name, raw in given.items()}
    for p in params:
        if p.name not in values and not callable(p.default):
            values[p.name] = p.default
    for p in params:
        if p.name not in values:
            values[p.name] = p.convert(owner, p.default(values))
    return {p.name: values[p.name] for p in params}


# --------------------------------------------------------------------------- option dataclasses


def option(default: Any, doc: str, *, minimum: float | None = None, maximum: float | None = None,
           strict: bool = False, choices: tuple[str, ...] = (), keywords: tuple[str, ...] = (),
           default_text: str | None = None) -> Any:
    """A field of an :class:`OptionSet`: its default, help and valid range (the type is the annotation)."""
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "strict": strict, "choices": tuple(choices),
            "keywords": tuple(keywords), "default_text": default_text}
    return dataclasses.field(default=default, metadata={"harden": meta})


def _kind_of(annotation: Any) -> tuple[type, bool, bool]:
    """(item type, optional, many) of an annotation: float, int | None, tuple[str, ...], float | str, ..."""
    optional, many = False, False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        numbers = [a for a in rest if a in (int, float)]
        annotation = numbers[0] if numbers else rest[0]   # float | str: a number with keywords
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        many, annotation = True, args[0]
    if annotation not in (float, int, str, bool):
        raise TypeError(f"option type {annotation!r} is not float, int, str, bool or a tuple of one")
    return annotation, optional, many


class OptionSet:
    """Base of a method's options dataclass: typed fields made with :func:`option`."""

    _params: ClassVar[tuple[Param, ...] | None] = None

    @classmethod
    def params(cls) -> tuple[Param, ...]:
        if cls.__dict__.get("_params") is None:
            hints = typing.get_type_hints(cls)
            params = []
            for f in dataclasses.fields(cls):
                meta = f.metadata.get("harden")
                if meta is None:
                    continue
                kind, optional, many = _kind_of(hints[f.name])
                params.append(Param(f.name, kind, f.default, meta["doc"], minimum=meta["minimum"],
                                    strict=meta["strict"], maximum=meta["maximum"], choices=meta["choices"],
                                    keywords=meta["keywords"], optional=optional, many=many,
                                    default_text=meta["default_text"]))
            cls._params = tuple(params)
        return cls._params

    @classmethod
    def parse(cls, owner: str, given: dict[str, Any] | None = None) -> "OptionSet":
        """The options from ``given`` (text, Python or TOML values by name), defaults for the rest, checked."""
        instance = cls(**resolve(cls.params(), owner, {k.replace("-", "_"): v for k, v in (given or {}).items()}))
        instance.check(owner)
        return instance

    def check(self, owner: str) -> None:
        """Checks that involve several options (override where they exist)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready values by name (tuples as lists)."""
        out = {}
        for p in self.params():
            value = getattr(self, p.name)
            out[p.name] = list(value) if isinstance(value, tuple) else value
        return out

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        return {p.name: v for p, (k, v) in zip(self.params(), self.to_dict().items())
                if (list(p.default) if isinstance(p.default, tuple) else p.default) != v}

    def label(self, name: str) -> str:
        """``name:key=value,...`` of the options that differ from their defaults (parses back to these options)."""
        changed = self.changed()
        if not changed:
            return name
        return name + ":" + ",".join(f"{k}={_bracketed(format_value(tuple(v) if isinstance(v, list) else v))}"
                                     for k, v in changed.items())


def help_rows(params: tuple[Param, ...]) -> list[tuple[str, str, str, str]]:
    """(name, type and range, default, help) per option, for ``harden methods NAME`` and docs."""
    return [(p.name, p.describe_kind(), p.describe_default(), p.doc) for p in params]

