"""Bench's record (:class:`BenchReport`, kind ``edgeforge.bench``): each model's tests with medians, IQR and raw
samples, its ceiling, the bandwidth and the machine; ``edgeforge bench --json`` writes ``to_dict()``."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from edgeforge.records import Record, described
from edgeforge.runners.conditions import Provenance, Round
from edgeforge.verify.machine import Bandwidth, Ceiling, Machine

TIMED = ("tokenizer excluded (prompts are fixed random token ids); TTFT = prefill forward from an empty cache "
         "+ argmax of the last logits; ppN t/s = N / TTFT; tgN = N single-token forwards after a prefill of "
         "the shortest prompt, greedy, N / their total time; load = artifact open or eager load + KV-cache "
         "setup (runtime imports timed apart), n=1")


# ---- statistics ----

@dataclass(frozen=True)
class Spread:
    """Median, quartiles (linear interpolation), IQR = q3 - q1, mean, sample stddev (0 for n = 1), n."""

    median: float = described("median")
    q1: float = described("first quartile")
    q3: float = described("third quartile")
    iqr: float = described("q3 - q1")
    mean: float = described("mean")
    stddev: float = described("sample standard deviation (0 for n = 1)")
    min: float = described("smallest sample")
    max: float = described("largest sample")
    n: int = described("samples")

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        ordered = sorted(samples)
        q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
        return cls(median=statistics.median(ordered), q1=q1, q3=q3, iqr=q3 - q1, mean=statistics.fmean(ordered),
                   stddev=statistics.stdev(ordered) if len(ordered) > 1 else 0.0, min=ordered[0], max=ordered[-1],
                   n=len(ordered))


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- the record ----

@dataclass(frozen=True, kw_only=True)
class TestResult:
    """One llama-bench test: ``pp16`` (prefill 16 tokens from an empty cache) or ``tg32`` (decode 32 tokens after
    ``depth`` cached ones)."""

    name: str = described("ppN (prefill N tokens) or tgN (decode N tokens)")
    tokens: int = described("tokens per sample")
    depth: int = described("tokens already cached when it starts")
    samples_s: list[float] = described("seconds per timed repetition")
    samples_tok_s: list[float] = described("tokens/s per timed repetition")
    tok_s: Spread = described("tokens/s")
    ttft_ms: Spread | None = described("time to first token, ms (pp tests only)")
    speedup: Spread | None = described("per-round tok/s ratio against the reference (null on the reference)",
                                       default=None)


@dataclass(frozen=True, kw_only=True)
class ModelResult:
    """One model's measurements."""

    role: str = described("candidate or reference")
    label: str = described("what the table calls it")
    path: str = described("where it was read")
    format: str = described("pte or onnx in their runtime, else eager")
    backend: str = described("runtime and delegate (torch eager for eager models)")
    scheme: str = described("fp32, 8da4w, ...")
    size_bytes: int = described("bytes on disk")
    parameters: int = described("parameter count")
    max_seq_len: int = described("KV-cache length it ran with")
    import_s: float = described("runtime imports, not in load_s")
    load_s: float = described("open/load + KV-cache setup, n=1")
    rss_after_import_bytes: int = described("resident memory of its own process after imports")
    rss_after_load_bytes: int = described("the same after load")
    peak_rss_bytes: int = described("ru_maxrss: interpreter + torch + runtime + weights + KV cache + activations")
    threads_note: str = described("how threads were set")
    tests: list[TestResult] = described("the prefill tests, then the decode test")
    ceiling: Ceiling | None = described("decode against the bandwidth ceiling; null: the runner measures no bandwidth")
    bytes_basis: str = described("where bytes per token come from")
    provenance: Provenance | None = described("what measured it: artifact and runner hashes, the worker's command "
                                              "line, threads, CPU mask, device identity and OS build (null: the "
                                              "runner reports none)", default=None)
    rounds: list[Round] = described("every run in order, warm-up rounds first: the waits before it and the "
                                    "device's conditions before and after; the timed ones are the samples",
                                    default_factory=list)

    def test(self, name: str) -> TestResult:
        return next(t for t in self.tests if t.name == name)

    @property
    def decode_test(self) -> TestResult:
        """The tgN test (the last)."""
        return self.tests[-1]


@dataclass(frozen=True, kw_only=True)
class BenchRun:
    """The settings a bench ran with (BenchSettings', resolved)."""

    prompt_lengths: tuple[int, ...] = described("prefill tests' token counts")
    decode_tokens: int = described("tokens per decode sample")
    repetitions: int = described("timed rounds")
    warmup: int = described("untimed rounds first")
    threads: int = described("CPU threads used")
    bandwidth_bytes: int | None = described("working set asked of the bandwidth test, null: above 4x the LLC")
    seed: int = described("draws the prompt token ids")
    cores: list[int] = described("CPUs the models may run on")
    decode_depth: int = described("tokens cached before decode (the shortest prompt)")
    warmup_s: float = described("warm-up went on until this many seconds had passed, and warmup rounds", default=0.0)
    cooldown_s: float = described("seconds slept before each timed sample", default=0.0)
    max_temp_c: float | None = described("temperature gate before each timed sample, °C (null: none)", default=None)
    max_temp_wait_s: float = described("the most the gate waits before sampling anyway", default=300.0)


@dataclass(frozen=True, kw_only=True)
class BenchReport(Record):
    """Everything one bench run measured (`edgeforge bench --json`, and `bench` in a forge report)."""

    kind = "edgeforge.bench"
    version = 1

    models: list[ModelResult] = described("the candidate first, then its reference")
    settings: BenchRun = described("what ran")
    prompt_token_ids: list[list[int]] = described("the prompts, one per prefill test")
    bandwidth: Bandwidth | None = described("the device's measured memory bandwidth; null: its runner cannot "
                                            "measure it")
    machine: Machine = described("the device's facts")
    timed: str = described("what is timed, in words", default=TIMED)
    caveats: list[str] = described("why figures may mislead (load, oversubscription, cache)", default_factory=list)

    @property
    def candidate(self) -> ModelResult:
        return self.models[0]

    @property
    def reference(self) -> ModelResult | None:
        return self.models[1] if len(self.models) > 1 else None
