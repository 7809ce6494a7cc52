"""Runners: where bench runs a model, behind one protocol (this machine's processes; later a phone over adb,
a board over ssh, a device farm).

    runner = runner_for(default_device("local"))   # edgeforge.runners.farm: a farm file's devices, or none
    environment = runner.environment(threads=None)
    bandwidth = runner.measure_bandwidth(environment, repetitions=5, size_bytes=None, probe_bytes=(10**6,))
    with runner.prepare(model, environment) as prepared:      # model: edgeforge.verify.bench_models.BenchModel
        facts = prepared.load()                               # LoadFacts
        samples = prepared.run(Workload(prompts=[[1, 2, 3]], decode_context=[1, 2, 3], decode_tokens=8))
        state = prepared.conditions()                         # optional: temperatures, governors, load, around samples
        peak_rss_bytes = prepared.finish()

A runner is added by a class with these methods, made with the farm's ``Device`` it measures on
(``RunnerClass(device)``; its connection fields are the class's ``Connection`` dataclass, see
:mod:`edgeforge.runners.farm`), and an entry point in the group ``edgeforge.runners`` (built-ins register there
too, in edgeforge's own ``pyproject.toml``); ``edgeforge bench --runner NAME`` takes its choices from
:data:`RUNNERS`, which holds the classes. Importing this package imports neither torch nor a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgeforge.registry import Registry


@dataclass(frozen=True)
class Environment:
    """Facts of the device a runner measures on.

    threads: threads each model runs with; cores: the CPUs they are pinned to (may be fewer than threads:
    oversubscribed); machine: ``edgeforge.verify.machine.Machine.to_dict()``'s fields (CPU, memory, load,
    versions, timestamp) as the device reports them.
    """

    threads: int
    cores: list[int]
    machine: dict


@dataclass(frozen=True)
class Workload:
    """One timed round: each prompt prefilled from an empty cache, then ``decode_tokens`` greedy single-token
    forwards after a prefill of ``decode_context`` (token ids throughout; the tokenizer is not timed)."""

    prompts: list[list[int]]
    decode_context: list[int]
    decode_tokens: int


@dataclass(frozen=True)
class Samples:
    """One round's timings: prefill_s per prompt (TTFT: forward + argmax of the last logits), decode_s for
    all decode forwards together."""

    prefill_s: list[float]
    decode_s: float


@dataclass(frozen=True)
class LoadFacts:
    """import_s: runtime imports (not in load_s); load_s: open or eager load + KV-cache setup; rss_*: the
    model's process's resident memory after imports and after load; threads_note: how threads were set."""

    import_s: float
    load_s: float
    rss_after_import_bytes: int
    rss_after_load_bytes: int
    threads_note: str


class PreparedModel(Protocol):
    """One model on the device, ready to load; a context manager (leaving it frees the device)."""

    def load(self) -> LoadFacts:
        """Load the model in its runtime (or eager torch), once."""

    def run(self, workload: Workload) -> Samples:
        """Time one round of ``workload``."""

    def conditions(self) -> dict:
        """Optional: the device's state now, ``edgeforge.runners.conditions.Conditions``' fields (temperatures,
        governors, frequencies, load; null fields say why they cannot be read). Bench reads it before and after every
        run; without it the record says the runner reads none."""

    def identity(self) -> dict:
        """Optional: this model's part of ``edgeforge.runners.conditions.Provenance`` (runner_sha256, runner_basis,
        command, uname, os_build), asked once after load."""

    def finish(self) -> int:
        """Peak resident memory of the model's process, in bytes; the model is done after this."""

    def __enter__(self) -> PreparedModel: ...

    def __exit__(self, *exc_info) -> None: ...


class Runner(Protocol):
    name: str  # short lowercase registry name: "local", "adb", "ssh"
    device: object  # the edgeforge.runners.farm.Device it was made for

    def __init__(self, device) -> None: ...

    def environment(self, *, threads: int | None) -> Environment:
        """The device's facts, with ``threads`` resolved (None: the device's ``threads``, else every CPU its
        ``cpu_mask`` and the device let us use)."""

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        """The device's memory bandwidth (``edgeforge.verify.machine.Bandwidth``), measured with nothing
        else loaded: a large read and copy working set, and reads of ``probe_bytes`` (each model's bytes per
        decoded token)."""

    def prepare(self, model, environment: Environment) -> PreparedModel:
        """Put ``model`` (``edgeforge.verify.bench_models.BenchModel``) on the device, pinned and threaded as
        ``environment`` says."""

    def probe(self) -> dict:
        """For ``edgeforge devices`` (optional: a runner without it is listed as unchecked): what the device runs,
        as ``local_worker``'s probe reports it (python, edgeforge, cpus, versions, runtimes: artifact format ->
        None or why its runtime does not import); RuntimeFailure when the device cannot be reached."""


RUNNERS: Registry[type[Runner]] = Registry("runners", "runner")
DEFAULT_RUNNER = "local"  # this machine: every model in its own process
