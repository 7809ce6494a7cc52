"""Files on disk: writes that never leave a half-written file at the destination (temp sibling, then rename)
and never overwrite an input, the one content hash, JSON and TOML reads that name the file on error."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from edgeforge.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling file path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, record: dict | list) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False) + "\n")


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """InputError naming ``output`` when it is one of ``inputs``, lies inside one, or contains one (symlinks
    resolved), so that writing or replacing it can never destroy what the run reads."""
    target = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is the input"
        elif target.is_relative_to(source):
            relation = "lies inside the input"
        elif source.is_relative_to(target):
            relation = "contains the input"
        else:
            continue
        raise InputError(f"output {relation} {given}, which it would overwrite: choose another output path",
                         path=output)


@contextmanager
def atomic_directory(path: str | Path, *, inputs: Iterable[str | Path | None] = ()):
    """Yield a temporary sibling directory; on success it replaces ``path``, on error it is removed.

    ``inputs``: what the run reads; an output that overlaps one is refused (InputError) before anything
    is written or deleted. The old ``path`` is moved aside only once the new directory is complete."""
    path = Path(path)
    refuse_overlap(path, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp creates 0700; some writers create 0600 files
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~mask)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary siblings of ``path`` left by runs that were killed mid-write: only those whose
    owning process (the PID in the name, ``.NAME.PID.*.tmp``) is gone; a concurrent run's stay."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        owner = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an old ``path`` is first renamed aside, then removed."""
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        old = old / path.name
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def content_files(directory: str | Path) -> list[Path]:
    """The files that make up a directory's content: its regular files at any depth, sorted, except hidden
    ones (any part of the path starting with '.': OS and editor litter, edgeforge's own temporaries)."""
    directory = Path(directory)
    return sorted(file for file in directory.rglob("*") if file.is_file()
                  and not any(part.startswith(".") for part in file.relative_to(directory).parts))


def content_sha256(*paths: str | Path) -> str:
    """SHA-256 over files, in path order: each file's name and bytes. A directory stands for its
    ``content_files``, each named by its path inside the directory. The one hash of checkpoints,
    quantized checkpoints and artifacts that manifests record and stages compare."""
    named: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_dir():
            named += [(file, file.relative_to(given).as_posix()) for file in content_files(given)]
        else:
            named.append((given, given.name))
    digest = hashlib.sha256()
    for file, name in sorted(named):
        digest.update(name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


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


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, or InputError naming the file."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from exc


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
