"""What produced a record: installed package versions and the commit of the edgeforge checkout."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path


def package_versions(*packages: str) -> dict[str, str | None]:
    """Each package's installed version (its distribution's metadata), None where it is not installed."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    """The commit of the edgeforge checkout (None for an installed wheel or without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None
