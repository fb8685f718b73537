"""Name -> factory registries with did-you-mean errors."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message suggests the closest one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def suggest(name: str, choices: list[str], prefix: str = "") -> str:
    """' — did you mean 'x'?' for the closest choice (shown with ``prefix``), or '' if none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        close = [lowered[c] for c in close]
    return f" — did you mean '{prefix}{close[0]}'?" if close else ""


def unknown_name(
    subject: str, name: object, choices: list[str], listed: str = "choices", prefix: str = ""
) -> str:
    """The one wording of every unknown-name error: "<subject> — did you mean 'x'? (choices:
    a, b, c)", the suggestion only when a choice is close."""
    hint = suggest(str(name), choices, prefix)
    return f"{subject}{hint} ({listed}: {', '.join(choices) or 'none'})"


class Registry(Generic[T]):
    """A named collection of factories (flow classes, targets, datasets, experiments).

    ``modules`` names items before they exist: name -> the module that registers it, imported
    on the first :meth:`get` (so a registry of names costs no import of what they name). With
    ``plugins`` (a flowvae.plugins.PluginSource) it also answers to names of entries that live
    outside the package: 'module:Name', 'file.py:Name' and installed entry points."""

    def __init__(
        self, kind: str, modules: Mapping[str, str] | None = None, plugins: Any = None
    ) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules = dict(modules or {})
        self.plugins = plugins

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return decorator

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its item (for plugins and tests that register temporarily)."""
        if name not in self._items:
            self.get(name)  # raises UnknownNameError with a suggestion
        self._modules.pop(name, None)
        return self._items.pop(name)

    def names(self) -> list[str]:
        """Registered names and installed entry points (not the module/file specs)."""
        known = {*self._items, *self._modules}
        if self.plugins is None:
            return sorted(known)
        return sorted({*known, *self.plugins.entry_points()})

    def is_registered(self, name: str) -> bool:
        """True for a name registered in this process (built-in, or by an imported module)."""
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items and name in self._modules:
            importlib.import_module(self._modules[name])  # registers it
        if name in self._items:
            return self._items[name]
        found = self.plugins.find(name) if self.plugins is not None else None
        if found is not None:
            return found
        message = unknown_name(f"unknown {self.kind} '{name}'", name, self.names())
        raise UnknownNameError(message)

    def __contains__(self, name: object) -> bool:
        """A plugin name that cannot be loaded raises its PluginError (one line saying why)."""
        if name in self._items or name in self._modules:
            return True
        return self.plugins is not None and self.plugins.find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
