"""The registry's own behaviour: entries by name, and a block that leaves it as it found it."""

from __future__ import annotations

import sys

import pytest

from edgeforge.errors import UnknownNameError
from edgeforge.registry import Registry
from tests.writers import write_plugin_distribution


class Named:
    def __init__(self, name: str):
        self.name = name


def test_isolated_drops_what_was_registered_or_loaded_inside_and_keeps_what_was_there(tmp_path, monkeypatch):
    registry: Registry[Named] = Registry("toyaxis", "toy thing", make=lambda cls: cls("plugged"))
    kept = registry.register(Named("kept"))
    module = "class Named:\n    def __init__(self, name):\n        self.name = name\n"
    site = write_plugin_distribution(tmp_path / "site", registry.group, {"plugged": "toy_named:Named"},
                                     {"toy_named": module})
    monkeypatch.syspath_prepend(str(site))
    with registry.isolated():
        registry.register(Named("inside"))
        assert registry.get("plugged").name == "plugged"
        assert registry.names() == ["inside", "kept", "plugged"]
        monkeypatch.undo()
    sys.modules.pop("toy_named", None)
    assert registry.names() == ["kept"] and registry.get("kept") is kept
    with pytest.raises(UnknownNameError):
        registry.get("inside")


def test_isolated_empty_starts_with_nothing_registered():
    registry: Registry[Named] = Registry("toyaxis", "toy thing")
    registry.register(Named("kept"))
    with registry.isolated(empty=True):
        assert registry.names() == [] and "kept" not in registry
    assert registry.names() == ["kept"]
