"""Bench: how fast an artifact runs on a device (this machine by default), beside its fp32 eager reference,
against the memory-bandwidth ceiling.

    record = bench("llama-int4.pte.d")          # reference: the fp32 checkpoint its manifests name
    record = bench("llama-int4.pte.d", runner="adb")   # any name in edgeforge.runners.RUNNERS
    print(format_bench(record)); json.dumps(record.to_dict())

Inputs: an exported artifact (.pte / ONNX directory), an edgeforge quantized checkpoint (run eager)
or an fp32 checkpoint (run eager). Output: a :class:`BenchReport` with load time, TTFT and prefill
tokens/s per prompt length (``pp16`` ...), decode tokens/s (``tg32``), peak RSS and size per model;
the paired speed-up against the reference; the measured bandwidth; the machine.

Method (llama-bench's, with medians): a runner (:mod:`edgeforge.runners`) reports the device's facts and
bandwidth and holds each model; the ``local`` runner keeps each in its own fresh process
(:mod:`edgeforge.runners.local_worker`, which documents what is timed), so its peak RSS is its own.
Both are loaded, then untimed rounds until both ``warmup`` rounds and ``warmup_s`` seconds are reached,
and ``repetitions`` timed rounds, alternating the two models within each round (ABBA) so a noisy
neighbour slows both alike; speed-up is the median of the per-round ratios. Before each timed sample
bench sleeps ``cooldown_s`` and, with ``max_temp_c``, waits (at most ``max_temp_wait_s``) until the
device's hottest readable thermal zone is under it. Every figure is a median with its IQR, stddev and
n; the raw samples are in the record, each with the device's conditions before and after it and the
waits before it (:class:`edgeforge.runners.conditions.Round`), and each model with what measured it
(:class:`edgeforge.runners.conditions.Provenance`).

Ceiling: decode reads every weight once per token, so tokens/s <= bandwidth / bytes per token.
Bytes per token are what the scheme implies (integers at their bit width + fp32 scales + fp32
rest; one row of an untied embedding table), not a runtime's packed layout or the KV cache.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from edgeforge.errors import ConfigError
from edgeforge.fileio import content_sha256
from edgeforge.records import decode
from edgeforge.runners import Environment, LoadFacts, Samples, Workload
from edgeforge.runners.conditions import Conditions, Provenance, Round, describe_rounds, wait_for_temperature
from edgeforge.verify.bench_models import BenchModel, decode_bytes_per_token, default_reference, describe_bench_model
from edgeforge.verify.bench_record import BenchReport, BenchRun, ModelResult, Spread, TestResult
from edgeforge.verify.machine import Bandwidth, Ceiling, Machine, bandwidth_ceiling

__all__ = ["BenchReport", "BenchRun", "BenchSettings", "Ceiling", "ModelResult", "Spread", "TestResult",
           "bandwidth_ceiling", "bench", "decode_bytes_per_token", "describe_bench_model", "format_bench"]


@dataclass(frozen=True)
class BenchSettings:
    """What to run.

    prompt_lengths: prefill tests (``ppN``); the shortest is also the context decode starts from.
    decode_tokens: tokens per decode sample (``tgN``). repetitions: timed rounds; warmup: untimed rounds, and
    warmup_s: the least seconds they take (warm-up goes on until both are reached).
    threads: CPU threads (None: every CPU this process may use). bandwidth_bytes: working set of the
    bandwidth test (None: above 4x the last-level cache). seed: draws the prompt token ids.
    cooldown_s: sleep before each timed sample. max_temp_c: before each timed sample wait, at most
    max_temp_wait_s, until the device's hottest readable thermal zone is under this (None: no gate).
    """

    prompt_lengths: tuple[int, ...] = (16, 64, 256)
    decode_tokens: int = 32
    repetitions: int = 5
    warmup: int = 1
    threads: int | None = None
    bandwidth_bytes: int | None = None
    seed: int = 0
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    max_temp_c: float | None = None
    max_temp_wait_s: float = 300.0

    def __post_init__(self):
        if not self.prompt_lengths or any(not isinstance(n, int) or n < 1 for n in self.prompt_lengths):
            raise ConfigError(f"prompt lengths must be positive integers, got {self.prompt_lengths!r}")
        if len(set(self.prompt_lengths)) != len(self.prompt_lengths):
            raise ConfigError(f"prompt lengths must be distinct, got {self.prompt_lengths!r}")
        for name in ("decode_tokens", "repetitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"warmup must be >= 0 and threads >= 1, got {self.warmup} and {self.threads}")
        if min(self.warmup_s, self.cooldown_s) < 0 or self.max_temp_wait_s <= 0 or \
                (self.max_temp_c is not None and self.max_temp_c <= 0):
            raise ConfigError(f"warm-up and cooldown seconds must be >= 0, the temperature gate's limit and wait > 0, "
                              f"got {self.warmup_s}, {self.cooldown_s}, {self.max_temp_c}, {self.max_temp_wait_s}")

    def key_fields(self) -> dict:
        """The settings that name a matrix job: every field, the pacing ones only where not at their default (jobs
        written before they existed keep their keys)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in PACING_FIELDS}
        return {name: value for name, value in asdict(self).items() if defaults.get(name, object()) != value}

    @classmethod
    def from_options(cls, *, prompt_lengths: str | None = None, **options) -> BenchSettings:
        """From CLI options: None means the default; prompt lengths as "16,64,256"."""
        chosen = {k: v for k, v in options.items() if v is not None}
        if prompt_lengths is not None:
            try:
                chosen["prompt_lengths"] = tuple(int(part) for part in prompt_lengths.split(","))
            except ValueError:
                raise ConfigError(f"--prompt-lengths takes comma-separated integers, got {prompt_lengths!r}") from None
        return cls(**chosen)


PACING_FIELDS = ("warmup_s", "cooldown_s", "max_temp_c", "max_temp_wait_s")


@dataclass(frozen=True)
class Measured:
    """A session's measurements, per model in the order given: load facts, timed samples, every round (warm-up
    included) with its conditions, peak RSS, the worker's identity (None: its runner reports none); and the device's
    bandwidth (None: its runner cannot measure it)."""

    bandwidth: Bandwidth | None
    loads: list[LoadFacts]
    runs: list[list[Samples]]
    rounds: list[list[Round]]
    peaks: list[int]
    identities: list[dict | None]


# ---- the run ----

def bench(artifact: str | Path, *, reference: str | Path | None = None, settings: BenchSettings = BenchSettings(),
          runner: str | None = None, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure ``artifact`` and its fp32 eager reference (``reference``, or the one its manifests name) on the
    device of ``runner`` (a name in :data:`edgeforge.runners.RUNNERS`; None: ``DEFAULT_RUNNER``)."""
    from edgeforge.runners import DEFAULT_RUNNER
    from edgeforge.runners.farm import default_device, runner_for

    say = progress or (lambda message: None)
    device = runner_for(default_device(runner or DEFAULT_RUNNER))
    candidate = describe_bench_model(artifact)
    reference_path = reference if reference is not None else default_reference(candidate)
    models = [candidate] + ([describe_bench_model(reference_path)] if reference_path is not None else [])
    if len(models) > 1 and models[1].config.vocab_size != candidate.config.vocab_size:
        raise ConfigError(f"reference {models[1].path} has vocabulary {models[1].config.vocab_size}, "
                          f"{candidate.path} has {candidate.config.vocab_size}: not the same model")
    if len(models) > 1:  # same KV-cache length, so attention costs the same
        models[1] = replace(models[1], max_seq_len=min(candidate.max_seq_len, models[1].config.max_seq_len))
    check_lengths(settings, models)
    environment = device.environment(threads=settings.threads)
    threads, cores, machine = environment.threads, environment.cores, Machine(**environment.machine)
    caveats = [f"{threads} threads on {len(cores)} CPUs: oversubscribed"] if threads > len(cores) else []
    caveats += [warning for model in models for warning in model.warnings]
    workload = draw_workload(settings, candidate.config.vocab_size)
    prompts, context = workload.prompts, workload.decode_context

    if machine.load_average_1m > machine.usable_cpus:
        caveats.append(f"load average {machine.load_average_1m:.1f} on {machine.usable_cpus} CPUs: other "
                       "processes compete for them, so timings are noisy (see the IQR) and multi-threaded runs "
                       "suffer most (a descheduled thread stalls every parallel op)")
    measured = measure_interleaved(device, environment, models, settings, workload, say=say)
    bandwidth = measured.bandwidth
    if bandwidth is None:
        caveats.append(f"bandwidth: the {device.name} runner cannot measure it, so no decode ceiling is set")
    elif bandwidth.note:
        caveats.append(f"bandwidth: {bandwidth.note}")
    results = [model_result(role, model, measured, index, settings, environment, content_sha256(model.path))
               for index, (role, model) in enumerate(zip(("candidate", "reference"), models))]
    if len(results) > 1:
        results[0] = replace(results[0], tests=[
            replace(test, speedup=Spread.of([c / r for c, r in zip(test.samples_tok_s, ref_test.samples_tok_s)]))
            for test, ref_test in zip(results[0].tests, results[1].tests)])
    else:
        caveats.append("no reference: the candidate is itself an fp32 eager checkpoint (pass --reference to compare)")
    run = BenchRun(**{**asdict(settings), "threads": threads, "cores": cores, "decode_depth": len(context)})
    return BenchReport(models=results, settings=run, prompt_token_ids=prompts, bandwidth=bandwidth,
                       machine=machine, caveats=caveats)


def draw_workload(settings: BenchSettings, vocab_size: int) -> Workload:
    """The timed round: prompts of random token ids drawn with ``settings.seed``; decode starts after the shortest."""
    rng = random.Random(settings.seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in settings.prompt_lengths]
    context = prompts[settings.prompt_lengths.index(min(settings.prompt_lengths))]
    return Workload(prompts=prompts, decode_context=context, decode_tokens=settings.decode_tokens)


def measure_interleaved(device, environment, models: list[BenchModel], settings: BenchSettings, workload: Workload,
                        *, say: Callable[[str], None]) -> Measured:
    """Bandwidth, then every model prepared on the runner's device: load, warm-up (by count and time) and timed
    rounds (ABBA), each timed one after the cooldown and the temperature gate; peak RSS."""
    say(f"measuring memory bandwidth with {environment.threads} thread(s) ...")
    bandwidth = device.measure_bandwidth(environment, repetitions=max(settings.repetitions, 3),
                                         size_bytes=settings.bandwidth_bytes,
                                         probe_bytes=tuple(sorted({model.bytes_per_token for model in models})))
    with ExitStack() as stack:
        prepared = [stack.enter_context(device.prepare(model, environment)) for model in models]
        loads = []
        for handle, model in zip(prepared, models):
            say(f"loading {model.path} ({model.backend}) on the {device.name} runner ...")
            loads.append(handle.load())
        identities = [handle.identity() if hasattr(handle, "identity") else None for handle in prepared]
        runs, rounds = [[] for _ in models], [[] for _ in models]
        warmed, warm_start = 0, time.monotonic()
        while warmed < settings.warmup or time.monotonic() - warm_start < settings.warmup_s:
            say(f"warm-up {warmed + 1}/{settings.warmup}" + (f" (and {settings.warmup_s:g} s)" if settings.warmup_s
                                                            else "") + " ...")
            for index in _round_order(warmed, len(models)):
                rounds[index].append(_sample(prepared[index], workload, settings, timed=False)[1])
            warmed += 1
        for repetition in range(settings.repetitions):
            say(f"round {repetition + 1}/{settings.repetitions} ...")
            for index in _round_order(warmed + repetition, len(models)):
                samples, record = _sample(prepared[index], workload, settings, timed=True)
                runs[index].append(samples)
                rounds[index].append(record)
        peaks = [handle.finish() for handle in prepared]
    return Measured(bandwidth=bandwidth, loads=loads, runs=runs, rounds=rounds, peaks=peaks, identities=identities)


def _round_order(round_index: int, count: int):
    """ABBA: even rounds in the given order, odd rounds reversed."""
    return range(count) if round_index % 2 == 0 else reversed(range(count))


def _sample(handle, workload: Workload, settings: BenchSettings, *, timed: bool) -> tuple[Samples, Round]:
    """One run of ``handle``; a timed one after the cooldown and the temperature gate; the conditions around it."""
    def read() -> Conditions | None:
        reading = handle.conditions() if hasattr(handle, "conditions") else None
        return None if reading is None else decode(Conditions, reading, where="the device's conditions")

    cooldown = settings.cooldown_s if timed else 0.0
    time.sleep(cooldown)
    gate, gate_wait = (None, 0.0)
    if timed and settings.max_temp_c is not None:
        gate, gate_wait = wait_for_temperature(read, settings.max_temp_c, settings.max_temp_wait_s)
    before = read()
    start = time.perf_counter()
    samples = handle.run(workload)
    seconds = time.perf_counter() - start
    return samples, Round(timed=timed, seconds=seconds, cooldown_s=cooldown, gate_wait_s=gate_wait, gate=gate,
                          before=before, after=read())


def check_lengths(settings: BenchSettings, models: list[BenchModel]) -> None:
    for model in models:
        longest = max(max(settings.prompt_lengths), min(settings.prompt_lengths) + settings.decode_tokens)
        if longest > model.max_seq_len:
            raise ConfigError(f"{model.path} holds {model.max_seq_len} positions; the tests need {longest} "
                              "(longest prompt, or shortest prompt + decode tokens): lower --prompt-lengths or "
                              "--decode-tokens")


def model_result(role: str, model: BenchModel, measured: Measured, index: int, settings: BenchSettings,
                 environment: Environment, artifact_sha256: str) -> ModelResult:
    """The ``index``-th model's result from a session's measurements."""
    load, peak_rss, runs, rounds = measured.loads[index], measured.peaks[index], measured.runs[index], \
        measured.rounds[index]
    bandwidth, identity = measured.bandwidth, measured.identities[index]
    provenance = None if identity is None else Provenance(artifact_sha256=artifact_sha256, threads=environment.threads,
                                                          cores=environment.cores, **identity)
    tests = []
    for index, length in enumerate(settings.prompt_lengths):
        seconds = [run.prefill_s[index] for run in runs]
        tests.append(_test(f"pp{length}", length, 0, seconds, ttft=True))
    depth = min(settings.prompt_lengths)
    tests.append(_test(f"tg{settings.decode_tokens}", settings.decode_tokens, depth, [run.decode_s for run in runs]))
    ceiling = None if bandwidth is None else bandwidth_ceiling(
        bytes_per_token=model.bytes_per_token, bandwidth_gb_s=bandwidth.ceiling_gb_s,
        decode_tok_s=tests[-1].tok_s.median, at_size_gb_s=bandwidth.probe_gb_s(model.bytes_per_token))
    return ModelResult(role=role, label=model.label, path=str(model.path), format=model.format, backend=model.backend,
                       scheme=model.scheme, size_bytes=model.size_bytes, parameters=model.parameters,
                       max_seq_len=model.max_seq_len, import_s=load.import_s, load_s=load.load_s,
                       rss_after_import_bytes=load.rss_after_import_bytes,
                       rss_after_load_bytes=load.rss_after_load_bytes, peak_rss_bytes=peak_rss,
                       threads_note=load.threads_note, tests=tests, ceiling=ceiling, bytes_basis=model.bytes_basis,
                       provenance=provenance, rounds=rounds)


def _test(name: str, tokens: int, depth: int, seconds: list[float], *, ttft: bool = False) -> TestResult:
    rates = [tokens / s for s in seconds]
    return TestResult(name=name, tokens=tokens, depth=depth, samples_s=seconds, samples_tok_s=rates,
                      tok_s=Spread.of(rates), ttft_ms=Spread.of([s * 1e3 for s in seconds]) if ttft else None)


# ---- the printer ----

def format_bench(record: BenchReport) -> str:
    """A llama-bench-style table, then TTFT, load, memory, bandwidth ceiling, machine and what was timed."""
    settings = record.settings
    header = ("model", "size", "params", "backend", "threads", "test", "t/s median ± IQR", "σ", "n", "vs ref ± IQR")
    rows = []
    for model in record.models:
        for test in model.tests:
            speedup = ("1.00 (ref)" if model.role == "reference" else
                       f"{test.speedup.median:.2f}x ± {test.speedup.iqr:.2f}" if test.speedup else "-")
            rows.append((model.label, _mib(model.size_bytes), _count(model.parameters), model.backend,
                         str(settings.threads), test.name + (f" @ d{test.depth}" if test.depth else ""),
                         f"{test.tok_s.median:.1f} ± {test.tok_s.iqr:.1f}", f"{test.tok_s.stddev:.1f}",
                         str(test.tok_s.n), speedup))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(cell.ljust(w) if i < 6 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(row, widths))) + " |" for row in rows]
    lines.append("")
    for model in record.models:
        ttft = ", ".join(f"{t.name} {t.ttft_ms.median:.2f} ± {t.ttft_ms.iqr:.2f} ms" for t in model.tests if t.ttft_ms)
        ceiling = model.ceiling
        lines += [f"{model.role} {model.label} ({model.path})",
                  f"  TTFT     {ttft} (median ± IQR, n={model.tests[0].tok_s.n})",
                  f"  load     {model.load_s:.3f} s (n=1; runtime imports {model.import_s:.2f} s, not included)",
                  f"  peak RSS {_mib(model.peak_rss_bytes)} (the process after imports "
                  f"{_mib(model.rss_after_import_bytes)}, after load {_mib(model.rss_after_load_bytes)})",
                  _ceiling_line(ceiling)]
        if ceiling and ceiling.note:
            lines.append(f"           {ceiling.note}")
        lines.append(f"           bytes: {model.bytes_basis}")
        lines.append(f"  rounds   {describe_rounds(model.rounds)}")
    notes = {model.threads_note: model.role for model in record.models}
    threads = "; ".join(f"{role}: {note}" for note, role in notes.items()) if len(notes) > 1 else next(iter(notes))
    lines += ["", _bandwidth_line(record.bandwidth) if record.bandwidth else "bandwidth: not measured",
              _machine_line(record.machine), f"threads: {threads}",
              f"timed: {record.timed}"]
    lines += [f"caveat: {caveat}" for caveat in record.caveats]
    return "\n".join(lines)


def _ceiling_line(ceiling: Ceiling | None) -> str:
    if ceiling is None:
        return "  ceiling  none: the device's bandwidth was not measured"
    reached = f"reached {ceiling.share:.2%}" if ceiling.valid else "reached: INVALID"
    return (f"  ceiling  decode reads {ceiling.bytes_per_token / 1e6:.3f} MB/token; measured bandwidth "
            f"{ceiling.bandwidth_gb_s:.1f} GB/s -> ceiling {ceiling.ceiling_tok_s:,.0f} tok/s; {reached}"
            f" ({ceiling.decode_tok_s:.1f} tok/s median)")


def _bandwidth_line(bandwidth: Bandwidth) -> str:
    read, copy = Spread.of(bandwidth.read_samples_gb_s), Spread.of(bandwidth.copy_samples_gb_s)
    llc = bandwidth.llc_bytes
    cache = f" = {bandwidth.working_set_bytes / llc:.1f}x the {llc / 2**20:.0f} MiB LLC" if llc else ""
    return (f"bandwidth: read {read.median:.2f} ± {read.iqr:.2f} GB/s, copy {copy.median:.2f} ± {copy.iqr:.2f} GB/s "
            f"(median ± IQR, n={read.n}, {bandwidth.threads} thread(s), working set "
            f"{bandwidth.working_set_bytes / 2**20:.0f} MiB{cache}); ceilings use the best read run, "
            f"{bandwidth.ceiling_gb_s:.2f} GB/s" + (f"; reads of each model's bytes per token, 1 thread, best of "
                                                 f"{len(bandwidth.probes[0]['read_samples_gb_s'])}: " + ", ".join(
                f"{p['bytes'] / 1e6:.2f} MB {max(p['read_samples_gb_s']):.1f} GB/s" for p in bandwidth.probes)
                if bandwidth.probes else ""))


def _machine_line(machine: Machine) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in machine.versions.items() if version)
    frequency = (f"{machine.governor or '?'} {machine.cur_freq_khz / 1e6:.2f} GHz" if machine.cur_freq_khz
                 else "cpufreq not readable")
    memory = f"{machine.memory_total_bytes / 2**30:.1f} GiB" if machine.memory_total_bytes else "memory ?"
    return (f"machine: {machine.cpu_model}, {machine.usable_cpus}/{machine.logical_cpus} CPUs usable, "
            f"{frequency}, {memory}, {machine.os}, python {machine.python}, {versions}, "
            f"edgeforge {machine.edgeforge} ({(machine.git_commit or 'no git')[:10]}), "
            f"load average {machine.load_average_1m:.1f}, {machine.timestamp}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)
