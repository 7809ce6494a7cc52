"""The bench matrix's records: one :class:`MatrixJob` per finished (device, artifact) job, written to its own file
the moment it finishes, and the :class:`BenchMatrix` that gathers them with a :class:`JobSummary` per job
(medians with a distribution-free confidence interval, the coefficient of variation, ratios to the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from edgeforge.records import Record, described
from edgeforge.verify.bench_record import ModelResult, Spread
from edgeforge.verify.machine import Bandwidth, Machine

CONFIDENCE = 0.95


# ---- statistics ----

@dataclass(frozen=True)
class Estimate:
    """A median with its order-statistic confidence interval and the coefficient of variation (stddev / mean).

    The interval [x_(k), x_(n+1-k)] is the narrowest whose binomial coverage reaches ``CONFIDENCE``; with too
    few samples for that it is the whole range, and ``level`` says the coverage it has (n = 5: 0.9375); with
    one sample there is no interval and no CV."""

    median: float = described("median of the samples")
    low: float | None = described("lower end of the median's confidence interval, null for n = 1")
    high: float | None = described("upper end, null for n = 1")
    level: float | None = described("the interval's coverage (binomial), null for n = 1")
    cv: float | None = described("coefficient of variation, stddev / mean, null for n = 1")
    n: int = described("samples")

    @classmethod
    def of(cls, samples: list[float]) -> Estimate:
        spread, ordered = Spread.of(samples), sorted(samples)
        n = spread.n
        if n < 2:
            return cls(median=spread.median, low=None, high=None, level=None, cv=None, n=n)
        k, level = median_interval_rank(n)
        return cls(median=spread.median, low=ordered[k - 1], high=ordered[n - k], level=level,
                   cv=spread.stddev / spread.mean, n=n)


def median_interval_rank(n: int, confidence: float = CONFIDENCE) -> tuple[int, float]:
    """The largest rank k (1-based) such that [x_(k), x_(n+1-k)] covers the median with at least ``confidence``,
    and that coverage (1 - 2 P(Bin(n, 1/2) < k)); k = 1 with its smaller coverage when n is too small."""
    best, level = 1, 1 - 2 * 0.5 ** n
    below = 0.0  # P(Bin(n, 1/2) <= k - 1)
    for k in range(1, n // 2 + 1):
        below += comb(n, k - 1) / 2 ** n
        if 1 - 2 * below < confidence:
            break
        best, level = k, 1 - 2 * below
    return best, level


# ---- one job ----

@dataclass(frozen=True, kw_only=True)
class MatrixArtifact:
    """An artifact of the matrix, named by its content."""

    path: str = described("where it was read")
    label: str = described("what the table calls it")
    sha256: str = described("content hash (edgeforge.fileio.content_sha256): the job key's artifact part")


@dataclass(frozen=True, kw_only=True)
class MatrixJob(Record):
    """One finished (device, artifact) job, as written to ``jobs/<device>/<key>.json`` when it finished."""

    kind = "edgeforge.bench-job"
    version = 1

    key: str = described("sha256 of artifact hash + device name + settings: a rerun skips a job whose key is on disk")
    device: str = described("the farm's name for the device")
    device_entry: dict = described("the farm's entry for it: kind, labels, threads, cpu_mask, connection")
    runner: str = described("the runner that measured it")
    artifact: MatrixArtifact = described("what ran")
    session: str = described("the device session its rounds ran in; jobs of one session were interleaved round by round")
    interleaved_with: list[str] = described("sha256 of the other artifacts in that session, in round order")
    attempt: int = described("which attempt on the device succeeded (1: the first)")
    threads: int = described("threads the model ran with")
    cores: list[int] = described("CPUs it was pinned to")
    prompt_token_ids: list[list[int]] = described("the prompts, one per prefill test")
    result: ModelResult = described("load, peak memory and every test with its raw samples")
    bandwidth: Bandwidth | None = described("the device's memory bandwidth, measured at the start of the session; null: "
                                            "its runner cannot measure it")
    machine: Machine = described("the device's identity and facts, as it reported them")
    started: str = described("RFC 3339 UTC, session start")
    finished: str = described("RFC 3339 UTC, when the job's last round ended")


@dataclass(frozen=True, kw_only=True)
class JobFailure:
    """A device whose session failed on every attempt: its unfinished jobs, none written."""

    device: str = described("the farm's name for the device")
    artifacts: list[str] = described("sha256 of the artifacts whose jobs did not finish")
    attempts: int = described("sessions tried")
    error: str = described("the last attempt's error, one line")


# ---- the matrix ----

@dataclass(frozen=True, kw_only=True)
class Metric:
    """One figure of a job: its estimate from the job's raw samples, unstable when its CV is over the limit."""

    name: str = described("decode tok/s tgN, prefill tok/s ppN, TTFT ms ppN, load s, peak RSS bytes")
    unit: str = described("tok/s, ms, s or bytes")
    estimate: Estimate = described("median, confidence interval, CV, n")
    unstable: bool = described("its CV exceeds the matrix's max_cv: reported, not averaged into anything")


@dataclass(frozen=True, kw_only=True)
class Ratio:
    """A tok/s figure against the baseline artifact's on the same device."""

    name: str = described("the metric (tgN or ppN tok/s)")
    estimate: Estimate = described("per-round ratios when paired, else the ratio of the two medians (n = 1)")
    paired: bool = described("both ran interleaved in one session, so round i of each is paired")
    unstable: bool = described("either side is unstable")


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    """A device x artifact cell of the matrix."""

    device: str = described("the farm's name for the device")
    artifact: str = described("sha256 of the artifact")
    label: str = described("the artifact's label")
    reused: bool = described("read from an earlier run's job file, not measured now")
    metrics: list[Metric] = described("decode and prefill tok/s, TTFT, load time, peak RSS")
    ratios: list[Ratio] = described("tok/s against the baseline on this device (empty for the baseline itself)")
    ceiling_share: float | None = described("decode tok/s as a share of the device's bandwidth ceiling, null if invalid")
    unstable: bool = described("any of its tok/s or TTFT metrics is unstable")


@dataclass(frozen=True, kw_only=True)
class BenchMatrix(Record):
    """The artifacts x devices bench (`edgeforge bench A B --farm F --json`): every job, raw samples included."""

    kind = "edgeforge.bench-matrix"
    version = 1

    artifacts: list[MatrixArtifact] = described("the artifacts, in the order given")
    devices: list[str] = described("the devices, in the farm's order")
    baseline: str = described("sha256 of the artifact ratios are taken against")
    max_cv: float = described("a metric whose CV exceeds this is marked unstable")
    output_dir: str = described("where each job's file was written")
    jobs: list[MatrixJob] = described("every finished job, this run's and earlier runs'")
    summaries: list[JobSummary] = described("one per finished job, device by device")
    failures: list[JobFailure] = described("devices that failed on every attempt", default_factory=list)
