"""Writes that never leave a half-written file at the destination: temp sibling, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgeforge.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, record: dict | list) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run that was killed mid-write
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp creates 0700; some writers create 0600 files
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~mask)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, expected: type = dict):
    """A JSON object (or list) from ``path``, or InputError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from exc
    except ValueError as exc:
        raise InputError(f"not valid JSON ({exc})", path=path) from exc
    if not isinstance(data, expected):
        raise InputError(f"expected a JSON {'object' if expected is dict else 'list'}", path=path)
    return data


def read_toml(path: Path) -> dict:
    """A TOML document from ``path``, or InputError naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", path=path) from exc


def named_toml(name_or_path: str | Path, directory: Path, kind: str) -> Path:
    """A bundled TOML file of ``directory`` by bare name, or any TOML file by path; else UnknownNameError."""
    from edgeforge.errors import UnknownNameError

    path = Path(name_or_path)
    if path.suffix:
        return path
    bundled = {file.stem: file for file in sorted(directory.glob("*.toml"))}
    if str(name_or_path) not in bundled:
        raise UnknownNameError(kind, str(name_or_path), list(bundled))
    return bundled[str(name_or_path)]
