"""The conditions a sample ran under, read on the device by the worker that holds the model (its op ``conditions``),
and who and what measured it (its op ``provenance``): pure reads of ``/sys``, ``/proc`` and ``/etc/os-release``,
``None`` with the reason where a fact cannot be read (most VMs have no thermal zones and no cpufreq), never guessed.

    read_conditions() -> Conditions (thermal zones, cpufreq governors and frequencies, load average)
    read_identity()   -> the device's part of a Provenance (runner hash, uname, OS build)

Imports neither torch nor a runtime.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from edgeforge.records import described
from edgeforge.verify.machine import read_int, read_stripped

ROOT = Path("/")  # where /sys and /proc are read (a test points the readers at a folder of its own)


@dataclass(frozen=True, kw_only=True)
class ThermalZone:
    """One readable /sys/class/thermal zone."""

    zone: str = described("its sysfs name, e.g. thermal_zone0")
    type: str | None = described("what it measures (its type file: x86_pkg_temp, cpu-0-0-usr, ...)")
    celsius: float = described("temperature, °C (the temp file's millidegrees / 1000)")


@dataclass(frozen=True, kw_only=True)
class Conditions:
    """The device's state at one moment (before or after a sample)."""

    time_s: float = described("Unix time of the reading, seconds")
    temperatures: list[ThermalZone] = described("every thermal zone that could be read")
    hottest_c: float | None = described("the hottest readable zone, °C; null when none is readable")
    temperature_note: str | None = described("why no temperature was read, else null")
    governors: dict[str, str] = described("cpufreq policy -> scaling governor")
    frequencies_khz: dict[str, int] = described("cpufreq policy -> scaling_cur_freq, kHz")
    cpufreq_note: str | None = described("why no governor or frequency was read, else null")
    load_average: list[float] = described("1, 5 and 15 minute load averages")


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What measured a model, and where: the same for every sample of it."""

    artifact_sha256: str = described("content hash of what ran (edgeforge.fileio.content_sha256)")
    runner_sha256: str = described("sha256 over the worker's code that ran on the device (runner_basis says which)")
    runner_basis: str = described("what runner_sha256 covers")
    command: list[str] = described("the worker's exact command line on the device (ssh: the remote command)")
    threads: int = described("threads the model ran with")
    cores: list[int] = described("the CPU mask it was pinned to")
    uname: dict[str, str] = described("the device's uname: system, node, release, version, machine")
    os_build: str | None = described("/etc/os-release PRETTY_NAME (or getprop for phones), null if unreadable")


def read_conditions(root: Path = ROOT) -> Conditions:
    """The thermal zones, cpufreq policies and load average under ``root``, now."""
    zones, unreadable = [], []
    for folder in sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=_numbered):
        try:
            celsius = int((folder / "temp").read_text().strip()) / 1000
        except (OSError, ValueError) as exc:
            unreadable.append(f"{folder.name}: {getattr(exc, 'strerror', None) or exc}")
            continue
        zones.append(ThermalZone(zone=folder.name, type=read_stripped(folder / "type"), celsius=celsius))
    note = None if zones else (f"no thermal zone could be read ({'; '.join(unreadable)})" if unreadable else
                               f"{root / 'sys/class/thermal'} has no thermal zones (common in VMs)")
    governors, frequencies = {}, {}
    for policy in sorted((root / "sys/devices/system/cpu/cpufreq").glob("policy*"), key=_numbered):
        governor, frequency = read_stripped(policy / "scaling_governor"), read_int(policy / "scaling_cur_freq")
        if governor:
            governors[policy.name] = governor
        if frequency is not None:
            frequencies[policy.name] = frequency
    cpufreq_note = None if governors or frequencies else \
        f"{root / 'sys/devices/system/cpu/cpufreq'} has no readable policies (no cpufreq: common in VMs)"
    return Conditions(time_s=time.time(), temperatures=zones, hottest_c=max((z.celsius for z in zones), default=None),
                      temperature_note=note, governors=governors, frequencies_khz=frequencies,
                      cpufreq_note=cpufreq_note, load_average=list(os.getloadavg()))


def read_identity(root: Path = ROOT) -> dict:
    """This device's part of a :class:`Provenance`: the hash of the edgeforge code running here (the worker and what
    it imports), uname and OS build."""
    uname = platform.uname()
    return {"runner_sha256": package_sha256(), "runner_basis": RUNNER_BASIS,
            "uname": {"system": uname.system, "node": uname.node, "release": uname.release, "version": uname.version,
                      "machine": uname.machine},
            "os_build": _os_release(root / "etc/os-release")}


RUNNER_BASIS = "the .py files of the edgeforge package the worker imported, by path inside it"


def package_sha256() -> str:
    """sha256 over edgeforge's installed .py files (each file's path inside the package, then its bytes)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _os_release(path: Path) -> str | None:
    text = read_stripped(path)
    for line in (text or "").splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return None


def _numbered(path: Path) -> tuple[str, int]:
    """thermal_zone2 before thermal_zone10."""
    stem = path.name.rstrip("0123456789")
    return stem, int(path.name[len(stem):] or 0)


# ---- pacing: the waits before a sample ----

GATE_POLL_S = 1.0  # the temperature gate reads the device this often while it waits


@dataclass(frozen=True, kw_only=True)
class Round:
    """One run of a model (a timed sample, or a warm-up round): the waits before it and the conditions around it."""

    timed: bool = described("a sample (true) or a warm-up round")
    seconds: float = described("wall time of the run call, channel round trip included")
    cooldown_s: float = described("seconds slept before it (--cooldown-s)")
    gate_wait_s: float = described("seconds the temperature gate waited before it")
    gate: str | None = described("what the temperature gate found (under, limit reached, unreadable); null: no gate")
    before: Conditions | None = described("the device's state just before it; null: the runner reads none")
    after: Conditions | None = described("just after it")


def wait_for_temperature(read, max_c: float, limit_s: float, *, sleep=time.sleep,
                         clock=time.monotonic) -> tuple[str, float]:
    """Wait until the hottest readable zone is under ``max_c`` (reading ``read()``, a :class:`Conditions`, every
    GATE_POLL_S), at most ``limit_s``; what was found, in words, and the seconds waited. Unreadable: said, not
    waited for."""
    start = clock()
    while True:
        conditions = read()
        waited = clock() - start
        if conditions is None:
            return "unreadable: the runner reads no conditions", waited
        if conditions.hottest_c is None:
            return f"unreadable: {conditions.temperature_note}", waited
        if conditions.hottest_c < max_c:
            return f"under: {conditions.hottest_c:.1f} °C < {max_c:g} °C after {waited:.1f} s", waited
        if waited >= limit_s:
            return (f"limit reached: {conditions.hottest_c:.1f} °C >= {max_c:g} °C after {waited:.1f} s "
                    f"(limit {limit_s:g} s); sampled anyway"), waited
        sleep(min(GATE_POLL_S, limit_s - waited))


def describe_rounds(rounds: list[Round]) -> str:
    """One line: warm-up and timed rounds, the waits, the temperatures the samples started at (or why none)."""
    warm, timed = [r for r in rounds if not r.timed], [r for r in rounds if r.timed]
    if not rounds:
        return "no rounds recorded"
    warm_s = warm[-1].after.time_s - warm[0].before.time_s if warm and warm[0].before and warm[-1].after else None
    parts = [f"{len(warm)} warm-up" + (f" ({warm_s:.2f} s)" if warm_s is not None else ""), f"{len(timed)} timed"]
    if any(r.cooldown_s for r in timed):
        parts.append(f"cooldown {timed[0].cooldown_s:g} s before each")
    gated = any(r.gate for r in timed)
    starts = [r.before for r in timed if r.before]
    hottest = [c.hottest_c for c in starts if c.hottest_c is not None]
    if hottest:
        parts.append(f"hottest zone at sample start {min(hottest):.1f}-{max(hottest):.1f} °C")
        if gated:
            parts.append(f"gate waited {sum(r.gate_wait_s for r in timed):.1f} s in all, last: {timed[-1].gate}")
    else:
        unread = f"temperature unreadable: {starts[0].temperature_note}" if starts else \
            "conditions: the runner reads none"
        parts.append(unread + (" (so the temperature gate could not apply)" if gated else ""))
    return "; ".join(parts)
