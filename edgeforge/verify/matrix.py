"""The bench matrix: artifacts x devices, with nothing lost.

    devices = load_farm("farm.toml").select("os=linux")      # edgeforge.runners.farm
    record = bench_matrix(["a.pte.d", "b.pte.d"], devices, "bench-out", settings=BenchSettings(repetitions=5))
    print(format_matrix(record)); json.dumps(record.to_dict())

Each device runs in a thread of its own, one session at a time: its unfinished artifacts are loaded side by side
and their timed rounds interleaved (bench's :func:`~edgeforge.verify.bench.measure_interleaved`: A B, B A, ...),
so a drift of the device's speed slows all of them alike and cancels in the ratios. A job is one (device,
artifact); its key is the sha256 of the artifact's content hash, the device's name and the settings. When a
session ends its jobs are written at once, each to ``OUT/jobs/<device>/<key>.json`` (atomically), so Ctrl-C or a
crash loses nothing finished, and a rerun reads them instead of measuring again; the whole record goes to
``OUT/matrix.json`` at the end. A session that fails with a
runtime or connection error is retried (``retries`` times) with a fresh runner (``runner_for``), then its jobs are marked failed;
other devices' jobs are untouched. Only the artifacts run: no fp32 reference is added (pass it as an artifact).
Where a session runs is ``run_session``'s choice: by default :func:`measure_session` in the device's thread, here;
:class:`edgeforge.verify.matrix_ray.RaySessions` runs it on the Ray node that owns the device (``bench --ray``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from edgeforge.errors import ConfigError, EdgeforgeError, RuntimeFailure
from edgeforge.fileio import content_sha256, read_json, refuse_overlap, write_json_atomic
from edgeforge.runners.farm import Device, runner_for
from edgeforge.verify.bench import (BenchSettings, check_lengths, describe_bench_model, draw_workload,
                                    measure_interleaved, model_result)
from edgeforge.verify.bench_models import BenchModel
from edgeforge.verify.machine import Machine, utc_now
from edgeforge.verify.matrix_record import (BenchMatrix, Estimate, JobFailure, JobSummary, MatrixArtifact,
                                            MatrixJob, Metric, Ratio)

DEFAULT_MAX_CV = 0.10
DEFAULT_RETRIES = 2
MATRIX_FILE = "matrix.json"  # in the output directory: the last run's whole record
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# measures one session: (device, pending (model, artifact) pairs, settings, workload, attempt, say) -> its jobs
RunSession = Callable[..., list[MatrixJob]]


def bench_matrix(artifacts: list[str | Path], devices: list[Device], output_dir: str | Path, *,
                 settings: BenchSettings = BenchSettings(), baseline: str | Path | None = None,
                 max_cv: float = DEFAULT_MAX_CV, retries: int = DEFAULT_RETRIES,
                 progress: Callable[[str], None] | None = None, run_session: RunSession | None = None) -> BenchMatrix:
    """Bench every artifact on every device (see the module); ``baseline``: the artifact ratios are taken against
    (default the first); ``run_session``: what measures one device session (default :func:`measure_session`)."""
    say = progress or (lambda message: None)
    models = [describe_bench_model(path) for path in artifacts]
    described = _artifacts(models)
    base = _baseline(described, baseline)
    _check_devices(devices, max_cv, retries)
    check_lengths(settings, models)
    out = Path(output_dir)
    refuse_overlap(out, [model.path for model in models])
    workload = draw_workload(settings, min(model.config.vocab_size for model in models))

    finished: dict[tuple[str, str], tuple[MatrixJob, bool]] = {}  # (device, sha256) -> (job, reused)
    failures: dict[str, JobFailure] = {}
    bugs: list[BaseException] = []

    def device_thread(device: Device) -> None:
        try:
            failure = _run_device(device, models, described, settings, workload, out, retries, finished,
                                  lambda message: say(f"[{device.name}] {message}"), run_session or measure_session)
            if failure:
                failures[device.name] = failure
        except BaseException as exc:  # a bug: raised in the caller's thread once every device has stopped
            bugs.append(exc)

    threads = [threading.Thread(target=device_thread, args=(device,), name=f"bench-{device.name}", daemon=True)
               for device in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # joined in slices, so Ctrl-C reaches this thread (finished jobs are on disk)
            thread.join(0.2)
    if bugs:
        raise bugs[0]
    jobs = [finished[device.name, artifact.sha256] for device in devices for artifact in described
            if (device.name, artifact.sha256) in finished]
    record = BenchMatrix(artifacts=described, devices=[device.name for device in devices], baseline=base,
                         max_cv=max_cv, output_dir=str(out), jobs=[job for job, _ in jobs],
                         summaries=[_summary(job, reused, finished.get((job.device, base)), max_cv)
                                    for job, reused in jobs],
                         failures=[failures[device.name] for device in devices if device.name in failures])
    write_json_atomic(out / MATRIX_FILE, record.to_dict())
    return record


def job_key(artifact_sha256: str, device: Device, settings: BenchSettings) -> str:
    """What a finished job is known by: the artifact's content, the device's name, the settings (the bench's, and
    the device entry's kind, threads and CPU mask)."""
    text = json.dumps({"artifact": artifact_sha256, "device": device.name, "settings": settings.key_fields(),
                       "kind": device.kind, "threads": device.threads, "cpu_mask": device.cpu_mask}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def job_path(output_dir: str | Path, device: str, key: str) -> Path:
    return Path(output_dir) / "jobs" / device / f"{key[:24]}.json"


def _artifacts(models: list[BenchModel]) -> list[MatrixArtifact]:
    described, seen = [], {}
    for model in models:
        sha256 = content_sha256(model.path)
        if sha256 in seen:
            raise ConfigError(f"{model.path} has the same content as {seen[sha256]}: give each artifact once")
        seen[sha256] = model.path
        described.append(MatrixArtifact(path=str(model.path), label=model.label, sha256=sha256))
    return described


def _baseline(artifacts: list[MatrixArtifact], baseline: str | Path | None) -> str:
    if baseline is None:
        return artifacts[0].sha256
    wanted = Path(baseline).resolve()
    for artifact in artifacts:
        if Path(artifact.path).resolve() == wanted:
            return artifact.sha256
    raise ConfigError(f"baseline {baseline} is not one of the artifacts: "
                      + ", ".join(artifact.path for artifact in artifacts))


def _check_devices(devices: list[Device], max_cv: float, retries: int) -> None:
    names = [device.name for device in devices]
    if not names:
        raise ConfigError("no devices to bench on")
    for name in names:
        if not DEVICE_NAME.fullmatch(name):
            raise ConfigError(f"device name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"device {repeated[0]!r} is named twice")
    if max_cv <= 0 or retries < 0:
        raise ConfigError(f"max CV must be > 0 and retries >= 0, got {max_cv} and {retries}")


# ---- one device ----

def _run_device(device: Device, models: list[BenchModel], artifacts: list[MatrixArtifact],
                settings: BenchSettings, workload, out: Path, retries: int,
                finished: dict, say: Callable[[str], None], run_session: RunSession) -> JobFailure | None:
    """Read the device's finished jobs, then measure the rest in one interleaved session, retried on a runtime or
    connection failure; each job is written as soon as the session ends. Returns the failure, if it failed."""
    pending = []
    for model, artifact in zip(models, artifacts):
        path = job_path(out, device.name, job_key(artifact.sha256, device, settings))
        if path.exists():
            finished[device.name, artifact.sha256] = (MatrixJob.from_dict(read_json(path), path=path), True)
            say(f"{artifact.label}: finished in an earlier run ({path})")
        else:
            pending.append((model, artifact))
    if not pending:
        return None
    error: EdgeforgeError | OSError | None = None
    for attempt in range(1, retries + 2):
        try:
            for job in run_session(device, pending, settings, workload, attempt, say):
                write_json_atomic(job_path(out, device.name, job.key), job.to_dict())
                finished[device.name, job.artifact.sha256] = (job, False)
            return None
        except (RuntimeFailure, OSError) as exc:  # the device or its connection: worth another session
            error = exc
            say(f"attempt {attempt}/{retries + 1} failed: {one_line(exc)}")
        except EdgeforgeError as exc:  # bad input or configuration: the same again on a retry
            error = exc
            break
    return JobFailure(device=device.name, artifacts=[artifact.sha256 for _, artifact in pending],
                      attempts=attempt, error=one_line(error))


def measure_session(device: Device, pending: list[tuple[BenchModel, MatrixArtifact]], settings: BenchSettings,
                    workload, attempt: int, say: Callable[[str], None]) -> list[MatrixJob]:
    """One session on ``device``: its runner made afresh, the ``pending`` artifacts measured interleaved; their jobs."""
    runner = runner_for(device)
    environment = runner.environment(threads=settings.threads)
    started, session = utc_now(), uuid.uuid4().hex
    models = [model for model, _ in pending]
    measured = measure_interleaved(runner, environment, models, settings, workload, say=say)
    ended = utc_now()
    order = [artifact.sha256 for _, artifact in pending]
    jobs = []
    for index, (model, artifact) in enumerate(pending):
        result = model_result("artifact", model, measured, index, settings, environment, artifact.sha256)
        jobs.append(MatrixJob(key=job_key(artifact.sha256, device, settings), device=device.name,
                              device_entry=device.to_dict(), runner=runner.name, artifact=artifact, session=session,
                              interleaved_with=[sha for sha in order if sha != artifact.sha256], attempt=attempt,
                              threads=environment.threads, cores=environment.cores,
                              prompt_token_ids=workload.prompts, result=result, bandwidth=measured.bandwidth,
                              machine=Machine(**environment.machine), started=started, finished=ended))
    return jobs


def one_line(error: BaseException) -> str:
    """The error's first line (its type's name if it has no message)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


# ---- the summary ----

def _summary(job: MatrixJob, reused: bool, baseline: tuple[MatrixJob, bool] | None, max_cv: float) -> JobSummary:
    metrics = _metrics(job, max_cv)
    ratios = []
    if baseline is not None and baseline[0].artifact.sha256 != job.artifact.sha256:
        base_job = baseline[0]
        unstable = {metric.name for metric in metrics + _metrics(base_job, max_cv) if metric.unstable}
        for test in job.result.tests:
            base_test = base_job.result.test(test.name)
            paired = base_job.session == job.session and len(base_test.samples_tok_s) == len(test.samples_tok_s)
            estimate = (Estimate.of([a / b for a, b in zip(test.samples_tok_s, base_test.samples_tok_s)]) if paired
                        else Estimate.of([Estimate.of(test.samples_tok_s).median
                                          / Estimate.of(base_test.samples_tok_s).median]))
            name = f"{test.name} tok/s"
            ratios.append(Ratio(name=name, estimate=estimate, paired=paired, unstable=name in unstable))
    ceiling = job.result.ceiling
    return JobSummary(device=job.device, artifact=job.artifact.sha256, label=job.artifact.label, reused=reused,
                      metrics=metrics, ratios=ratios, ceiling_share=ceiling.share if ceiling and ceiling.valid else None,
                      unstable=any(metric.unstable for metric in metrics))


def _metrics(job: MatrixJob, max_cv: float) -> list[Metric]:
    """tok/s of every test (decode last), TTFT of the prefill tests, then load time and peak RSS (n = 1)."""
    result = job.result
    figures = [(f"{test.name} tok/s", "tok/s", test.samples_tok_s) for test in result.tests]
    figures += [(f"{test.name} TTFT", "ms", [s * 1e3 for s in test.samples_s]) for test in result.tests if test.ttft_ms]
    figures += [("load", "s", [result.load_s]), ("peak RSS", "bytes", [float(result.peak_rss_bytes)])]
    metrics = []
    for name, unit, samples in figures:
        estimate = Estimate.of(samples)
        metrics.append(Metric(name=name, unit=unit, estimate=estimate,
                              unstable=estimate.cv is not None and estimate.cv > max_cv))
    return metrics


# ---- the printer ----

MATRIX_HEADER = ("device", "artifact", "test", "t/s median [CI]", "CV", "n", "vs baseline", "")


def matrix_rows(record: BenchMatrix) -> list[tuple[str, ...]]:
    """The table's rows (columns: MATRIX_HEADER), one per device x artifact x tok/s test."""
    rows = []
    for summary in record.summaries:
        ratios = {ratio.name: ratio for ratio in summary.ratios}
        for metric in (m for m in summary.metrics if m.unit == "tok/s"):
            versus = "baseline" if summary.artifact == record.baseline else _versus(ratios.get(metric.name))
            rows.append((summary.device, summary.label, metric.name.removesuffix(" tok/s"),
                         _interval(metric.estimate, ".1f"), _cv(metric.estimate), str(metric.estimate.n), versus,
                         "UNSTABLE" if metric.unstable else ("reused" if summary.reused else "")))
    return rows


def format_matrix(record: BenchMatrix) -> str:
    """One row per device x artifact x tok/s test, then TTFT, load and memory per job, then the failures."""
    header, rows = MATRIX_HEADER, matrix_rows(record)
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.append("")
    for summary in record.summaries:
        by_name = {metric.name: metric for metric in summary.metrics}
        ttft = ", ".join(f"{m.name.removesuffix(' TTFT')} {_interval(m.estimate, '.2f')} ms"
                         + (" UNSTABLE" if m.unstable else "") for m in summary.metrics if m.unit == "ms")
        share = f"{summary.ceiling_share:.2%} of the bandwidth ceiling" if summary.ceiling_share is not None \
            else "bandwidth ceiling: INVALID or not measured"
        lines.append(f"{summary.device} {summary.label}: TTFT {ttft}; load {by_name['load'].estimate.median:.3f} s "
                     f"(n=1); peak RSS {by_name['peak RSS'].estimate.median / 2**20:.1f} MiB; decode at {share}")
    levels = sorted({(m.estimate.n, m.estimate.level) for s in record.summaries for m in s.metrics if m.estimate.level})
    coverage = ", ".join(f"{level:.1%} at n={n}" for n, level in levels)
    lines.append(f"UNSTABLE: CV above {record.max_cv:.0%}; CI: the median's distribution-free interval (order "
                 f"statistics; coverage {coverage or '-'}); jobs in {record.output_dir}")
    lines += [f"FAILED {failure.device} after {failure.attempts} attempt(s), {len(failure.artifacts)} job(s) not run: "
              f"{failure.error}" for failure in record.failures]
    return "\n".join(lines)


def _versus(ratio: Ratio | None) -> str:
    if ratio is None:
        return "-"  # the baseline did not finish on this device
    return f"{_interval(ratio.estimate, '.2f')}x" + ("" if ratio.paired else " (unpaired)")


def _interval(estimate: Estimate, spec: str) -> str:
    if estimate.low is None:
        return format(estimate.median, spec)
    return f"{estimate.median:{spec}} [{estimate.low:{spec}}, {estimate.high:{spec}}]"


def _cv(estimate: Estimate) -> str:
    return "-" if estimate.cv is None else f"{estimate.cv:.1%}"
