"""The machine a benchmark ran on: what it is (CPU, caches, memory, OS, tool versions) and how fast it
moves memory (a measured read and copy bandwidth), so decode speed can be set against its ceiling.

    describe_machine(threads=2)      -> Machine   (facts read from /proc, /sys, platform, importlib.metadata)
    measure_bandwidth(threads=2)     -> Bandwidth (torch read and copy over > 4x the last-level cache)
    bandwidth_ceiling(bytes_per_token=..., bandwidth_gb_s=..., decode_tok_s=...) -> Ceiling (share reached)

Facts that cannot be read here (no cpufreq in most VMs) are ``None``, never guessed.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from edgeforge import __version__
from edgeforge.errors import ConfigError
from edgeforge.provenance import git_commit, package_versions
from edgeforge.records import described

CPU_SYSFS = Path("/sys/devices/system/cpu/cpu0")
CACHE_MULTIPLE = 4  # the bandwidth working set is at least this many times the last-level cache
MIN_WORKING_SET_BYTES = 256 * 2**20
MEMORY_SHARE = 0.25  # never take more than this share of MemAvailable for the working set
VERSIONED_PACKAGES = ("torch", "executorch", "onnxruntime", "torchao", "numpy")
ARM = 0x41
ARM_CORES = {  # (CPU implementer, CPU part) of /proc/cpuinfo: the cores of phones and boards (Arm's TRMs)
    (ARM, 0xd03): "Cortex-A53", (ARM, 0xd04): "Cortex-A35", (ARM, 0xd05): "Cortex-A55", (ARM, 0xd07): "Cortex-A57",
    (ARM, 0xd08): "Cortex-A72", (ARM, 0xd09): "Cortex-A73", (ARM, 0xd0a): "Cortex-A75", (ARM, 0xd0b): "Cortex-A76",
    (ARM, 0xd0c): "Neoverse-N1", (ARM, 0xd0d): "Cortex-A77", (ARM, 0xd40): "Neoverse-V1", (ARM, 0xd41): "Cortex-A78",
    (ARM, 0xd44): "Cortex-X1", (ARM, 0xd46): "Cortex-A510", (ARM, 0xd47): "Cortex-A710", (ARM, 0xd48): "Cortex-X2",
    (ARM, 0xd49): "Neoverse-N2", (ARM, 0xd4d): "Cortex-A715", (ARM, 0xd4e): "Cortex-X3", (ARM, 0xd4f): "Neoverse-V2",
    (ARM, 0xd80): "Cortex-A520", (ARM, 0xd81): "Cortex-A720", (ARM, 0xd82): "Cortex-X4", (ARM, 0xd87): "Cortex-A725",
    (ARM, 0xd85): "Cortex-X925",
}


@dataclass(frozen=True)
class Machine:
    """Provenance of a measurement.

    cpu_model: /proc/cpuinfo's "model name", on ARM its cores (:func:`cpu_model`); logical_cpus: os.cpu_count();
    usable_cpus: CPUs this process may run on (affinity); threads: threads the benchmark asked for; governor / cur_freq_khz / max_freq_khz:
    cpufreq of cpu0 (None where /sys has no cpufreq, e.g. in most VMs); llc_bytes: last-level cache that
    cpu0 sees; load_average_1m: the run queue when the facts were read (above usable_cpus, other processes
    compete for the CPUs); versions: installed package versions (None if not installed); timestamp: RFC 3339 UTC.
    """

    cpu_model: str | None = described('/proc/cpuinfo "model name"; on ARM its cores ("4x Cortex-A72")')
    logical_cpus: int = described("os.cpu_count()")
    usable_cpus: int = described("CPUs this process may run on (affinity)")
    threads: int = described("threads the benchmark asked for")
    governor: str | None = described("cpufreq governor of cpu0, null where /sys has no cpufreq")
    cur_freq_khz: int | None = described("cpu0's current frequency, null where unreadable")
    max_freq_khz: int | None = described("cpu0's maximum frequency, null where unreadable")
    llc_bytes: int | None = described("last-level cache cpu0 sees")
    memory_total_bytes: int | None = described("MemTotal")
    load_average_1m: float = described("run queue when read (above usable_cpus: other processes compete)")
    os: str = described("platform")
    kernel: str = described("kernel release")
    python: str = described("Python version")
    edgeforge: str = described("edgeforge version")
    git_commit: str | None = described("edgeforge's git commit, null outside a checkout")
    versions: dict = described("installed package versions (null: not installed)")
    timestamp: str = described("RFC 3339 UTC")
    device_facts: dict = described("what a device's runner read beyond these fields (adb: rooted, cpufreq per policy, "
                                   "time_in_state, thermal zones, battery, screen); empty here", default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def describe_machine(*, threads: int) -> Machine:
    """What this machine is, read now."""
    return Machine(
        cpu_model=cpu_model(read_stripped(Path("/proc/cpuinfo")) or "") or platform.processor() or None,
        logical_cpus=os.cpu_count() or 0,
        usable_cpus=len(os.sched_getaffinity(0)), threads=threads,
        governor=read_stripped(CPU_SYSFS / "cpufreq" / "scaling_governor"),
        cur_freq_khz=read_int(CPU_SYSFS / "cpufreq" / "scaling_cur_freq"),
        max_freq_khz=read_int(CPU_SYSFS / "cpufreq" / "cpuinfo_max_freq"),
        llc_bytes=last_level_cache_bytes(), memory_total_bytes=_meminfo_bytes("MemTotal"),
        load_average_1m=os.getloadavg()[0],
        os=platform.platform(terse=True), kernel=platform.release(), python=platform.python_version(),
        edgeforge=__version__, git_commit=git_commit(), versions=package_versions(*VERSIONED_PACKAGES),
        timestamp=utc_now())


def utc_now() -> str:
    """Now, RFC 3339 UTC to the second ("2026-01-02T03:04:05Z")."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def last_level_cache_bytes() -> int | None:
    """Size of the highest-level data/unified cache cpu0 sees (sysfs), or None."""
    best = (0, None)
    for index in sorted((CPU_SYSFS / "cache").glob("index*")):
        level, kind, size = (read_stripped(index / name) for name in ("level", "type", "size"))
        if level and size and kind in ("Data", "Unified"):
            best = max(best, (int(level), _parse_size(size)), key=lambda pair: pair[0])
    return best[1]


# ---- memory bandwidth ----

@dataclass(frozen=True)
class Bandwidth:
    """Measured memory bandwidth, GB/s = 1e9 bytes/s.

    read: bytes of a float32 tensor summed / time; copy: (bytes read + bytes written) / time over a
    tensor copied into another of the same size (STREAM's counting: write-allocate traffic not counted).
    working_set_bytes: bytes touched per run (both halves for copy); llc_bytes: the cache it must exceed;
    samples are per repetition, after one untimed pass that faults the pages in.
    probes: read bandwidth over smaller working sets (each model's bytes per token), one thread, each
    sample repeating the sum for at least PROBE_SECONDS: a probe far faster than the large read means
    that working set is served from cache.
    ceiling_gb_s: the value ceilings use: the best large read run (on a shared machine the best run is
    the closest to what the memory system can do; medians are printed beside it).
    """

    read_samples_gb_s: list[float] = described("large read, GB/s per repetition")
    copy_samples_gb_s: list[float] = described("large copy, GB/s per repetition")
    working_set_bytes: int = described("bytes touched per run")
    llc_bytes: int | None = described("the last-level cache it must exceed")
    threads: int = described("threads of the large runs")
    probes: list[dict] = described("reads over each model's bytes per token: {bytes, threads (1), read_samples_gb_s}")
    note: str | None = described("why the figure may mislead (working set below 4x the LLC), else null")
    ceiling_gb_s: float = described("the best large read run: what ceilings use (computed)", init=False)
    method: str = described("how it was measured", default="torch float32 sum (read) and Tensor.copy_ (copy), "
                            "torch.set_num_threads(threads), one untimed pass first")

    def __post_init__(self):
        object.__setattr__(self, "ceiling_gb_s", max(self.read_samples_gb_s))

    def probe_gb_s(self, size_bytes: int) -> float | None:
        """The best probe read bandwidth over ``size_bytes`` (None if not probed)."""
        return next((max(p["read_samples_gb_s"]) for p in self.probes if p["bytes"] == size_bytes), None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Bandwidth:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.init})


def working_set_bytes(llc_bytes: int | None) -> tuple[int, str | None]:
    """Bytes to touch: at least CACHE_MULTIPLE x the LLC and MIN_WORKING_SET_BYTES, at most a share of free memory."""
    wanted = max(CACHE_MULTIPLE * (llc_bytes or 0) + 2**20, MIN_WORKING_SET_BYTES)
    available = _meminfo_bytes("MemAvailable")
    if available and wanted > MEMORY_SHARE * available:
        capped = int(MEMORY_SHARE * available) & ~(2**20 - 1)
        return capped, (f"working set capped at {capped / 2**20:.0f} MiB by free memory, below "
                        f"{CACHE_MULTIPLE}x the {(llc_bytes or 0) / 2**20:.0f} MiB LLC: cache hits may inflate it")
    note = None if llc_bytes else "LLC size unreadable: working set not checked against the cache"
    return wanted, note


def measure_bandwidth(*, threads: int, repetitions: int = 5, size_bytes: int | None = None,
                      probe_bytes: tuple[int, ...] = ()) -> Bandwidth:
    """Read and copy bandwidth with ``threads`` torch threads (restored afterwards), and one-thread read
    probes over each of ``probe_bytes``."""
    import torch

    llc = last_level_cache_bytes()
    size, note = working_set_bytes(llc) if size_bytes is None else (size_bytes, None)
    if size_bytes is not None and llc and size_bytes < CACHE_MULTIPLE * llc:
        note = (f"working set {size_bytes / 2**20:.0f} MiB (set by the caller) is below {CACHE_MULTIPLE}x the "
                f"{llc / 2**20:.0f} MiB LLC: cache hits may inflate it")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        reads, copies = _large_runs(size, repetitions)
        torch.set_num_threads(1)
        probes = [{"bytes": n, "threads": 1, "read_samples_gb_s": _probe(n, repetitions)} for n in probe_bytes]
    finally:
        torch.set_num_threads(previous)
    return Bandwidth(read_samples_gb_s=reads, copy_samples_gb_s=copies, working_set_bytes=size, llc_bytes=llc,
                     threads=threads, probes=probes, note=note)


PROBE_SECONDS = 0.02


def _large_runs(size_bytes: int, repetitions: int) -> tuple[list[float], list[float]]:
    """Read and copy GB/s over ``size_bytes``, after one untimed pass that faults the pages in."""
    import torch

    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    half = buffer.numel() // 2
    dst, src = buffer[:half], buffer[half:2 * half]
    reads, copies = [], []
    for run in range(repetitions + 1):
        read_s = _seconds(buffer.sum)
        copy_s = _seconds(lambda: dst.copy_(src))
        if run:
            reads.append(buffer.numel() * 4 / read_s / 1e9)
            copies.append(2 * half * 4 / copy_s / 1e9)
    return reads, copies


def _probe(size_bytes: int, repetitions: int) -> list[float]:
    import torch

    data = torch.ones(max(size_bytes // 4, 1), dtype=torch.float32)
    data.sum()
    samples = []
    for _ in range(repetitions):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < PROBE_SECONDS or not count:
            data.sum()
            count += 1
        samples.append(count * data.numel() * 4 / elapsed / 1e9)
    return samples


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# ---- the ceiling ----

CACHE_SPEEDUP = 1.5  # a probe this much faster than the large read: the working set is served from cache


@dataclass(frozen=True)
class Ceiling:
    """Decode tokens/s against bandwidth / bytes per token.

    share: decode_tok_s / ceiling_tok_s, None when the measurement is invalid (share_raw > 1: faster
    than reading the weights from memory allows, so the weights are served from cache, or the byte count
    or the timing is wrong). fits_in_cache: reading bytes_per_token alone (at_size_gb_s) runs at least
    CACHE_SPEEDUP x faster than the large read, so DRAM bandwidth does not bound decode and the share
    is no roofline; note says so in words.
    """

    bytes_per_token: int = described("weight bytes one decode step reads (what the scheme implies)")
    bandwidth_gb_s: float = described("the bandwidth it is set against (Bandwidth.ceiling_gb_s)")
    ceiling_tok_s: float = described("bandwidth / bytes per token")
    decode_tok_s: float = described("measured decode tokens/s (median)")
    share: float | None = described("decode_tok_s / ceiling_tok_s, null when invalid")
    share_raw: float = described("the same, even when above 1")
    valid: bool = described("share_raw <= 1")
    fits_in_cache: bool = described("reading bytes_per_token alone runs CACHE_SPEEDUP x faster: no roofline")
    at_size_gb_s: float | None = described("read bandwidth over a working set of bytes_per_token (a probe)")
    note: str | None = described("what the share means, in words")


def bandwidth_ceiling(*, bytes_per_token: int, bandwidth_gb_s: float, decode_tok_s: float,
                      at_size_gb_s: float | None = None) -> Ceiling:
    """The ceiling decode tokens/s and the share reached; a share above 100% is flagged, not reported.
    ``at_size_gb_s``: the read bandwidth measured over a working set of ``bytes_per_token`` (a probe)."""
    if bytes_per_token <= 0 or bandwidth_gb_s <= 0:
        raise ConfigError(f"bytes per token and bandwidth must be positive, got {bytes_per_token} and {bandwidth_gb_s}")
    ceiling_tok_s = bandwidth_gb_s * 1e9 / bytes_per_token
    share = decode_tok_s / ceiling_tok_s
    fits = at_size_gb_s is not None and at_size_gb_s >= CACHE_SPEEDUP * bandwidth_gb_s
    cache = (f"reading {bytes_per_token / 1e6:.2f} MB runs at {at_size_gb_s or 0:.0f} GB/s here against "
             f"{bandwidth_gb_s:.1f} GB/s from memory: the weights are served from cache")
    note = None
    if share > 1:
        note = (f"invalid: {share:.0%} of the memory-bandwidth ceiling; "
                + (f"{cache}, so DRAM bandwidth does not bound decode" if fits else
                   "the byte count or the timing is wrong"))
    elif fits:
        note = f"{cache}, so the share is no roofline"
    return Ceiling(bytes_per_token=int(bytes_per_token), bandwidth_gb_s=bandwidth_gb_s, ceiling_tok_s=ceiling_tok_s,
                   decode_tok_s=decode_tok_s, share=None if share > 1 else share, share_raw=share, valid=share <= 1,
                   fits_in_cache=fits, at_size_gb_s=at_size_gb_s, note=note)


# ---- small readers ----

def read_stripped(path: Path) -> str | None:
    """A small file's text, stripped; None when it cannot be read or is empty (sysfs facts a machine may lack)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """A small file's integer; None when unreadable or not one."""
    text = read_stripped(path)
    return int(text) if text and text.isdigit() else None


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU a /proc/cpuinfo text describes: x86's "model name"; on ARM, which reports none, its cores by
    "CPU implementer" and "CPU part" ("4x Cortex-A72", "2x Cortex-X4 + 6x Cortex-A720"), else "Hardware"."""
    found: dict[str, str] = {}
    cores: list[str] = []
    implementer = ""
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "CPU implementer":
            implementer = value
        elif key == "CPU part":
            cores.append(_arm_core_name(implementer, value))
        found.setdefault(key, value)
    if found.get("model name"):
        return found["model name"]
    if cores:
        return " + ".join(f"{count}x {name}" for name, count in Counter(cores).items())
    return found.get("Hardware") or None


def _arm_core_name(implementer: str, part: str) -> str:
    try:
        key = (int(implementer, 16), int(part, 16))
    except ValueError:
        return f"implementer {implementer} part {part}"
    return ARM_CORES.get(key, f"implementer {key[0]:#x} part {key[1]:#x}")


def _meminfo_bytes(field: str) -> int | None:
    for line in (read_stripped(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


