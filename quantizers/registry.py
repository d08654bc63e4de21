"""The one registry shape the suite uses for its extension points: methods
(quantizers/methods/), tasks (tasks/) and model families (fixtures/adapters/).

Each is a package whose modules register their entries when imported; the registry imports
every module of its package the first time anyone asks for an entry, so a new method, task or
family is one new module and nothing else is edited. It lives here, in the lowest layer
(quantizers/ imports nothing else of the suite), so tasks/ and fixtures/ can share it without
importing each other.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

Entry = TypeVar("Entry")


class UnknownEntry(KeyError):
    """A name no module of the registry's package registers; the message lists the known ones."""

    def __str__(self) -> str:   # KeyError would quote the message
        return self.args[0]


class Registry(Generic[Entry]):
    """Named entries of one kind, discovered from the modules of `package`.

    `kind` names the entries in errors ("method", "task", "model family"); `skip` lists the
    package's modules that hold shared code and register nothing (imported only if needed);
    `error` is the exception an unknown name raises (a UnknownEntry subclass, or ConfigError
    for a grid's method, so the grid's errors stay one type)."""

    def __init__(self, kind: str, package: str, skip: tuple[str, ...] = (),
                 error: Callable[[str], Exception] = UnknownEntry) -> None:
        self.kind, self.package, self.skip, self.error = kind, package, skip, error
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, name: str, entry: Entry) -> Entry:
        known = self._entries.get(name)
        if known is not None and known is not entry and _origin(known) != _origin(entry):
            raise ValueError(f"{self.kind} {name!r} is registered twice: by {_origin(known)} and {_origin(entry)}")
        self._entries[name] = entry
        return entry

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True   # first: a module that looks up an entry while importing must not recurse
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if module.name not in self.skip and not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def get(self, name: object, where: str = "") -> Entry:
        self._discover()
        if not isinstance(name, str) or name not in self._entries:
            prefix = f"{where}: " if where else ""
            raise self.error(f"{prefix}unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def all(self) -> dict[str, Entry]:
        self._discover()
        return dict(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.all())


def _origin(entry: object) -> str:
    """Where an entry was defined. A class registered again from the same module (a test that
    reloads it) is the same entry, not a clash; any other entry is itself."""
    if isinstance(entry, type):
        return f"{entry.__module__}.{entry.__qualname__}"
    return f"{type(entry).__name__} at {id(entry):#x}"
