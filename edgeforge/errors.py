"""Typed exceptions. Library code raises them; only the CLI turns them into one-line messages.

Exit codes are part of the interface (scripts and CI gates depend on them):
0 ok, 1 verdict failed, 2 bad input/config/unsupported, 3 runtime failure, 70 unexpected bug.
"""

from __future__ import annotations

from pathlib import Path


class EdgeforgeError(Exception):
    """Base class: a one-line message naming the file (when there is one) and the problem."""

    exit_code = 70

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class InputError(EdgeforgeError):
    """A file or directory the user gave cannot be read or is malformed."""

    exit_code = 2


class ConfigError(EdgeforgeError):
    """A config, recipe or option value is missing or invalid."""

    exit_code = 2


class UnsupportedError(EdgeforgeError):
    """The input is valid but edgeforge does not handle this architecture, dtype or combination."""

    exit_code = 2


class UnknownNameError(ConfigError):
    """A registry name (format, recipe, target, ...) that does not exist."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]):
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


class GateFailed(EdgeforgeError):
    """A measured artifact failed its drift/latency gate, or the export guard refused it."""

    exit_code = 1


class RuntimeFailure(EdgeforgeError):
    """A runtime or device could not run the artifact."""

    exit_code = 3
