"""Output paths: writes never destroy an input, never delete a concurrent run's temporary, and replace the old
destination only once the new one is complete; the one content hash; installed package versions."""

import os
import subprocess
import sys

import pytest

from edgeforge.errors import InputError
from edgeforge.fileio import atomic_directory, atomic_file, content_sha256, refuse_overlap
from edgeforge.provenance import package_versions


@pytest.fixture
def source(tmp_path):
    directory = tmp_path / "source"
    (directory / "nested").mkdir(parents=True)
    (directory / "weights.bin").write_bytes(b"weights")
    (directory / "nested" / "part.txt").write_text("part")
    return directory


def snapshot(directory):
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


@pytest.mark.parametrize("relation, output", [("is the input", "source"), ("lies inside the input", "source/out"),
                                              ("contains the input", ".")])
def test_atomic_directory_refuses_an_output_overlapping_an_input_before_touching_anything(source, relation, output):
    before, siblings = snapshot(source), sorted(source.parent.iterdir())
    destination = source.parent / output
    with pytest.raises(InputError) as refusal:
        with atomic_directory(destination, inputs=[source / "weights.bin" if output == "." else source]):
            pytest.fail("the body must not run")
    assert refusal.value.exit_code == 2 and refusal.value.path == destination
    assert str(refusal.value).startswith(f"{destination}: output {relation} ")
    assert snapshot(source) == before and sorted(source.parent.iterdir()) == siblings


def test_refuse_overlap_sees_through_symlinks_and_lets_siblings_pass(source, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(source)
    with pytest.raises(InputError, match="output is the input"):
        refuse_overlap(link, [source])
    refuse_overlap(tmp_path / "sourced", [source, None])  # a name sharing a prefix is not inside it


def test_stale_temporaries_of_dead_runs_go_and_a_live_runs_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.{dead.pid}.abc.tmp"
        concurrent = tmp_path / f".out.{alive.pid}.def.tmp"
        unowned = tmp_path / ".out.noowner.tmp"  # no PID in the name: whose it is cannot be told, so it stays
        for directory in (stale, concurrent, unowned):
            directory.mkdir()
            (directory / "half-written").write_text("x")
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "done").write_text("new")
        assert not stale.exists()
        assert (concurrent / "half-written").exists() and (unowned / "half-written").exists()
        assert (tmp_path / "out" / "done").read_text() == "new"
    finally:
        alive.kill()
        alive.wait()


def test_old_destination_stays_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out) as tmp:
            (tmp / "new").write_text("new")
            assert (out / "old").read_text() == "old"  # while the new one is written, the old one is whole
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and snapshot(out) == {"old": b"old"}
    with atomic_directory(out) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and snapshot(out) == {"new": b"new"}


def test_atomic_file_leaves_nothing_on_error_and_normal_permissions_on_success(tmp_path):
    path = tmp_path / "record.json"
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(path) as tmp:
        tmp.write_text("whole")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "whole" and path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert list(tmp_path.iterdir()) == [path]


def test_content_hash_covers_nested_files_by_path_and_skips_hidden_ones(source):
    digest = content_sha256(source)
    (source / ".DS_Store").write_text("litter")
    (source / ".cache").mkdir()
    (source / ".cache" / "x").write_text("litter")
    assert content_sha256(source) == digest
    (source / "nested" / "part.txt").write_text("changed")
    assert content_sha256(source) != digest
    (source / "nested" / "part.txt").write_text("part")
    (source / "nested" / "part.txt").rename(source / "part.txt")  # same bytes elsewhere: another content
    assert content_sha256(source) != digest


def test_content_hash_of_a_flat_directory_is_that_of_its_files(source):
    """A checkpoint hashes its file list, verify an artifact's directory: the two agree on the same files."""
    flat = source / "nested"
    (flat / "second.bin").write_bytes(b"2")
    assert content_sha256(flat) == content_sha256(flat / "second.bin", flat / "part.txt")


def test_package_versions_reads_installed_metadata():
    assert package_versions("pytest", "no-such-package-here") == {"pytest": pytest.__version__,
                                                                  "no-such-package-here": None}
