"""A plain dict behind a decorator: duplicates are refused, a miss lists what exists."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from harden.errors import HardenError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise HardenError(
                f"unknown {self.kind} {name!r}; supported: {', '.join(sorted(self._entries))}"
            ) from None

    def find(self, name: str) -> T | None:
        """The entry, or None where there is none (for callers with a fallback)."""
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
