"""One registry per axis (checkpoint formats, architectures, quantization algorithms, exporters, runners).

Built-ins and outside packages register the same way: an entry point in the group ``edgeforge.<axis>``
(``pyproject.toml``'s ``[project.entry-points."edgeforge.exporters"]``) names the object, and the registry
loads it the first time someone asks for a name. Code may also call :meth:`Registry.register` directly
(tests, or a module registering a variant at import), which wins over an entry point of the same name;
``with registry.isolated():`` undoes what a block registered or loaded (a test's toy plugin).
Loading is lazy per entry: asking for ``onnx`` never imports ExecuTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from edgeforge.errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one axis: ``registry.get(name)``, ``registry.names()``, ``registry.register(entry)``.

    ``make`` turns what an entry point loads (a class, say) into the entry (an instance); ``kind`` names the
    axis in error messages ("artifact format", "quantization algorithm").
    """

    def __init__(self, axis: str, kind: str, make: Callable[[object], T] | None = None):
        self.group, self.kind = f"edgeforge.{axis}", kind
        self._make = make or (lambda loaded: loaded)
        self._entries: dict[str, T] = {}
        self._pending: dict[str, EntryPoint] | None = None

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._pending is None:
            self._pending = {point.name: point for point in entry_points(group=self.group)}
        return self._pending

    def register(self, entry: T, name: str | None = None) -> T:
        """Add ``entry`` under ``name`` (default: its ``name`` attribute); returns it, so it works as a decorator."""
        self._entries[name or getattr(entry, "name")] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``, loading its entry point on first use; UnknownNameError lists the known ones."""
        if name not in self._entries:
            point = self._entry_points().get(name)
            if point is None:
                raise UnknownNameError(self.kind, name, self.names())
            try:
                loaded = point.load()
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"{self.kind} {name!r} ({point.value}, entry point group {self.group}) "
                                  f"cannot be loaded: {exc}") from exc
            self._entries.setdefault(name, self._make(loaded))
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered or installed name, sorted, without loading any."""
        return sorted(set(self._entries) | set(self._entry_points()))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._entry_points()

    def __iter__(self) -> Iterator[T]:
        """Every entry, loading each (for listings that need the entries' own attributes)."""
        return (self.get(name) for name in self.names())

    def refresh(self) -> None:
        """Forget the entry points seen so far (a distribution was installed or put on sys.path since)."""
        self._pending = None

    @contextmanager
    def isolated(self, *, empty: bool = False) -> Iterator[Registry[T]]:
        """A block after which the registry is as before it: entries registered or loaded inside are dropped and
        the entry points are read again on the way in and out (for a plugin put on sys.path for the block).
        ``empty``: inside, nothing is loaded or registered yet, only the installed entry points are there."""
        saved = dict(self._entries)
        if empty:
            self._entries = {}
        self.refresh()
        try:
            yield self
        finally:
            self._entries = saved
            self.refresh()
