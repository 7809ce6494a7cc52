from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.fail(f"{SHARED} is missing: the shared data folder must sit beside the repository")
    return SHARED


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Reference caches go to the test session's temporary folder, never to ~/.cache."""
    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "edgeforge-cache"))
