"""bench --farm: two artifacts x three devices (the local runner under two names, and a toy runner whose device
drops mid-run on every attempt). Finished jobs are on disk and kept when another device fails; the summary's
medians are those of the raw samples written; a rerun measures only what did not finish.

Runs are tiny (short prompts, 3 rounds, a 32 MiB bandwidth working set, 1 thread): they check the matrix and its
record, not the speed of anything.
"""

import json
import statistics
import time

import pytest
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.cli import main
from edgeforge.errors import RuntimeFailure
from edgeforge.fileio import content_sha256
from edgeforge.runners import RUNNERS, Environment, LoadFacts, Samples
from edgeforge.verify.bench import BenchSettings
from edgeforge.verify.matrix_record import BenchMatrix, Estimate, MatrixJob, median_interval_rank
from tests.test_runner_ssh import sshd  # noqa: F401  (the real sshd fixture)

ROUNDS = 3
SETTINGS = ["--prompt-lengths", "4,8", "--decode-tokens", "4", "-r", str(ROUNDS), "--warmup", "1", "-t", "1",
            "--bandwidth-mib", "32"]
FARM = """
[[device]]
name = "alpha"
kind = "local"
labels = {{ os = "linux" }}

[[device]]
name = "beta"
kind = "local"
labels = {{ os = "linux" }}

[[device]]
name = "flaky"
kind = "{flaky_kind}"
labels = {{ os = "linux" }}
"""


class DyingRunner:
    """A device that drops during the second round of every session (the model runs in this process)."""

    name = "dying"
    sessions = 0

    def __init__(self, device):
        self.device = device
        DyingRunner.sessions += 1

    def environment(self, *, threads):
        from edgeforge.verify.machine import describe_machine

        return Environment(threads=threads or 1, cores=[0], machine=describe_machine(threads=threads or 1).to_dict())

    def measure_bandwidth(self, environment, *, repetitions, size_bytes, probe_bytes):
        from edgeforge.verify.machine import Bandwidth

        return Bandwidth(read_samples_gb_s=[10.0] * repetitions, copy_samples_gb_s=[8.0] * repetitions,
                         working_set_bytes=1 << 30, llc_bytes=None, threads=environment.threads, probes=[], note=None)

    def prepare(self, model, environment):
        return DyingModel(model)


class DyingModel:
    def __init__(self, model):
        self.model, self.rounds = model, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def load(self):
        from edgeforge.verify.models import describe_model, open_session

        self.session = open_session(describe_model(self.model.path), max_seq_len=self.model.max_seq_len)
        return LoadFacts(import_s=0.0, load_s=0.01, rss_after_import_bytes=1, rss_after_load_bytes=1,
                         threads_note="in-process")

    def run(self, workload):
        import torch

        self.rounds += 1
        if self.rounds == 2:  # the warm-up round ran: the device drops in the first timed round
            raise RuntimeFailure("flaky: the connection to the device dropped")
        start = time.perf_counter()
        self.session.forward(torch.tensor([workload.decode_context]), torch.arange(len(workload.decode_context)))
        elapsed = time.perf_counter() - start
        return Samples(prefill_s=[elapsed] * len(workload.prompts), decode_s=elapsed)

    def finish(self):
        return 1


def _farm(tmp_path, flaky_kind, text=None):
    """A farm file in ``tmp_path``: ``text``, by default FARM with the flaky device of kind ``flaky_kind``."""
    path = tmp_path / f"farm-{flaky_kind}.toml"
    path.write_text(text or FARM.format(flaky_kind=flaky_kind))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, stories_int4):
    """The matrix through the CLI, the flaky device failing on its first attempt and its one retry."""
    tmp_path = tmp_path_factory.mktemp("matrix")
    out, record_path = tmp_path / "runs", tmp_path / "matrix.json"
    with RUNNERS.isolated():
        RUNNERS.register(DyingRunner)
        args = ["bench", str(DEFAULT_CHECKPOINT), str(stories_int4), "--farm", str(_farm(tmp_path, "dying")),
                "-o", str(out), "--retries", "1", "--max-cv", "1e-9", "--json", str(record_path), *SETTINGS]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result, BenchMatrix.from_dict(json.loads(record_path.read_text())), out, tmp_path


def test_a_failing_device_is_marked_and_every_other_job_is_kept(first_run, stories_int4):
    result, record, out, _ = first_run
    assert result.exit_code == 3, result.output + result.stderr
    assert result.stderr.splitlines()[-1].startswith("edgeforge: error: flaky failed on every attempt")
    assert DyingRunner.sessions == 2, "one session, then one retry"
    [failure] = record.failures
    assert failure.device == "flaky" and failure.attempts == 2 and "connection to the device dropped" in failure.error
    assert failure.artifacts == [artifact.sha256 for artifact in record.artifacts]
    assert [(job.device, job.artifact.path) for job in record.jobs] == [
        (device, path) for device in ("alpha", "beta") for path in (str(DEFAULT_CHECKPOINT), str(stories_int4))]
    assert sorted(p.relative_to(out).parts[:2] for p in (out / "jobs").rglob("*.json")) == [
        ("jobs", "alpha"), ("jobs", "alpha"), ("jobs", "beta"), ("jobs", "beta")], "nothing written for flaky"
    assert "FAILED flaky after 2 attempt(s), 2 job(s) not run" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| alpha ", "| beta "))]
    assert len(rows) == 2 * 2 * 3 and sum("UNSTABLE" in row for row in rows) == len(rows), "every tok/s row, flagged"


def test_jobs_on_one_device_are_interleaved_and_record_what_ran(first_run, stories_int4):
    _, record, _, _ = first_run
    hashes = {artifact.path: artifact.sha256 for artifact in record.artifacts}
    assert hashes == {str(DEFAULT_CHECKPOINT): content_sha256(DEFAULT_CHECKPOINT),
                      str(stories_int4): content_sha256(stories_int4)}
    for device in ("alpha", "beta"):
        fp32, int4 = [job for job in record.jobs if job.device == device]
        assert fp32.session == int4.session and fp32.interleaved_with == [int4.artifact.sha256]
        assert fp32.runner == "local" and fp32.device_entry["labels"] == {"os": "linux"} and fp32.attempt == 1
        assert fp32.threads == 1 and len(fp32.cores) == 1 and fp32.machine.cpu_model
        assert fp32.result.threads_note.startswith("torch.set_num_threads(1), CPU affinity")
        assert [len(ids) for ids in fp32.prompt_token_ids] == [4, 8] and fp32.prompt_token_ids == int4.prompt_token_ids
    assert len({job.session for job in record.jobs}) == 2, "one session per device"
    assert BenchMatrix.from_dict(json.loads(json.dumps(record.to_dict()))) == record, "bit-exact round trip"


def test_summary_medians_are_the_medians_of_the_raw_samples_on_disk(first_run):
    _, record, out, _ = first_run
    jobs = {(job.device, job.artifact.sha256): job for job in
            (MatrixJob.from_dict(json.loads(path.read_text())) for path in (out / "jobs").rglob("*.json"))}
    assert len(jobs) == len(record.summaries) == 4
    for summary in record.summaries:
        job = jobs[summary.device, summary.artifact]
        metrics = {metric.name: metric for metric in summary.metrics}
        for test in job.result.tests:
            assert len(test.samples_tok_s) == ROUNDS
            assert metrics[f"{test.name} tok/s"].estimate.median == statistics.median(test.samples_tok_s)
            assert metrics[f"{test.name} tok/s"].estimate.cv == statistics.stdev(test.samples_tok_s) / \
                statistics.fmean(test.samples_tok_s)
        assert metrics["pp4 TTFT"].estimate.median == statistics.median(s * 1e3 for s in job.result.test("pp4").samples_s)
        assert metrics["load"].estimate.n == 1 and metrics["load"].estimate.median == job.result.load_s
        # --max-cv 1e-9: every figure with a spread is marked, none is dropped
        assert all(metric.unstable for metric in summary.metrics if metric.estimate.n > 1) and summary.unstable
        baseline = jobs[summary.device, record.baseline]
        for ratio in summary.ratios:
            test = ratio.name.removesuffix(" tok/s")
            assert ratio.paired and ratio.unstable
            assert ratio.estimate.median == statistics.median(
                a / b for a, b in zip(job.result.test(test).samples_tok_s, baseline.result.test(test).samples_tok_s))
        assert bool(summary.ratios) == (summary.artifact != record.baseline)


def test_rerun_measures_only_the_jobs_that_did_not_finish(first_run, stories_int4, monkeypatch):
    import edgeforge.verify.matrix as matrix

    _, first, out, tmp_path = first_run
    sessions = []
    monkeypatch.setattr(matrix, "runner_for", lambda device: sessions.append(device.name) or RUNNERS.get(
        device.kind)(device))
    args = ["bench", str(DEFAULT_CHECKPOINT), str(stories_int4), "--farm", str(_farm(tmp_path, "local")),
            "-o", str(out), "--max-cv", "10", "--json", "-", *SETTINGS]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    record = BenchMatrix.from_dict(json.loads(result.stdout))
    assert sessions == ["flaky"], "alpha's and beta's jobs were finished: no runner was made for them"
    assert not record.failures and len(record.jobs) == 6
    assert [s.reused for s in record.summaries] == [True] * 4 + [False] * 2
    assert record.jobs[:4] == first.jobs, "the finished jobs, as written"
    assert not any(summary.unstable for summary in record.summaries), "--max-cv 10: nothing is unstable"
    assert (out / "matrix.json").exists() and len(list((out / "jobs").rglob("*.json"))) == 6


@pytest.mark.parametrize("extra, fragment", [
    ([], "--farm needs --output-dir"),
    (["-o", "OUT", "--baseline", "elsewhere.pte"], "baseline elsewhere.pte is not one of the artifacts"),
    (["-o", "OUT", "--devices", "os=android"], "no device matches 'os=android'"),
    (["-o", "OUT", "--reference", str(DEFAULT_CHECKPOINT)], "--reference and --runner do not apply with --farm"),
])
def test_bad_matrix_options_are_one_line_errors_and_write_nothing(tmp_path, extra, fragment):
    out = tmp_path / "OUT"
    args = ["bench", str(DEFAULT_CHECKPOINT), "--farm", str(_farm(tmp_path, "local")),
            *[str(out) if arg == "OUT" else arg for arg in extra]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_output_inside_an_artifact_and_an_artifact_given_twice_are_refused(tmp_path, stories_int4):
    farm = str(_farm(tmp_path, "local"))
    inside = CliRunner().invoke(main, ["bench", str(stories_int4), "--farm", farm, "-o", str(stories_int4 / "runs")])
    assert inside.exit_code == 2 and "lies inside the input" in inside.stderr
    assert not (stories_int4 / "runs").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in stories_int4.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    twice = CliRunner().invoke(main, ["bench", str(stories_int4), str(copy), "--farm", farm, "-o", str(tmp_path / "o")])
    assert twice.exit_code == 2 and "has the same content as" in twice.stderr


def test_several_artifacts_or_matrix_options_need_a_farm():
    result = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), str(DEFAULT_CHECKPOINT)])
    assert result.exit_code == 2 and "several ARTIFACTs: only with --farm" in result.stderr
    result = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), "--max-cv", "0.2"])
    assert result.exit_code == 2 and "--max-cv: only with --farm" in result.stderr


@pytest.mark.parametrize("n, rank, level", [(2, 1, 0.5), (5, 1, 0.9375), (6, 1, 0.96875), (10, 2, 1 - 22 / 1024),
                                            (20, 6, 0.958610)])
def test_median_interval_is_the_order_statistic_interval(n, rank, level):
    assert median_interval_rank(n) == (rank, pytest.approx(level, abs=1e-6))
    estimate = Estimate.of([float(value) for value in range(n, 0, -1)])
    assert (estimate.low, estimate.high) == (rank, n + 1 - rank) and estimate.median == (n + 1) / 2
    assert Estimate.of([3.0]).low is None and Estimate.of([3.0]).cv is None


def test_job_key_changes_with_artifact_device_and_settings():
    from edgeforge.runners.farm import Device
    from edgeforge.verify.matrix import job_key

    alpha, settings = Device(name="alpha", kind="local", labels={"os": "linux"}), BenchSettings()
    key = job_key("a" * 64, alpha, settings)
    assert key == job_key("a" * 64, Device(name="alpha", kind="local"), BenchSettings()), "labels only select"
    others = [job_key("b" * 64, alpha, settings), job_key("a" * 64, Device(name="beta", kind="local"), settings),
              job_key("a" * 64, alpha, BenchSettings(repetitions=6)),
              job_key("a" * 64, Device(name="alpha", kind="local", cpu_mask=(1,)), settings),
              job_key("a" * 64, Device(name="alpha", kind="local", threads=2), settings)]
    assert len({key, *others}) == 6


# ---- over ssh: two boards on a real sshd, and this machine ----

@pytest.mark.slow
def test_matrix_over_two_ssh_boards_and_local_keeps_results_when_one_board_drops(sshd, tmp_path, stories_int4,
                                                                                monkeypatch):
    import edgeforge.verify.matrix as matrix
    from edgeforge.runners.farm import load_farm
    from edgeforge.verify.matrix import bench_matrix

    # every worker process hears seven requests (setup, load, identity, then the warm-up round's conditions, run and
    # conditions, and the first sample's conditions), then its device is gone: during the first timed run
    dropping = tmp_path / "dropping-python"
    dropping.write_text("#!/bin/sh\n{ for request in 1 2 3 4 5 6 7; do IFS= read -r line || break; printf '%s\\n' "
                        "\"$line\"; "
                        f"done; }} | exec {sshd.python} \"$@\"\n")
    dropping.chmod(0o755)
    settings = BenchSettings(prompt_lengths=(4, 8), decode_tokens=4, repetitions=ROUNDS, warmup=1, threads=1,
                             bandwidth_bytes=32 * 2**20)
    artifacts, out = [DEFAULT_CHECKPOINT, stories_int4], tmp_path / "runs"
    board1, local = sshd.device_table("board1", cpu_mask=[0]), '[[device]]\nname = "here"\nkind = "local"\n'
    board2 = sshd.device_table("board2", cpu_mask=[0], python=str(dropping))
    farm = load_farm(_farm(tmp_path, "dropping", board1 + board2 + local))
    first = bench_matrix(artifacts, farm.devices, out, settings=settings, retries=1)

    assert [failure.device for failure in first.failures] == ["board2"] and first.failures[0].attempts == 2
    assert "died during run" in first.failures[0].error
    assert [(job.device, job.runner) for job in first.jobs] == [("board1", "ssh")] * 2 + [("here", "local")] * 2
    for job, summary in zip(first.jobs, first.summaries):
        raw = MatrixJob.from_dict(json.loads(matrix.job_path(out, job.device, job.key).read_text()))
        assert raw == job and summary.device == job.device
        metrics = {metric.name: metric for metric in summary.metrics}
        for test in raw.result.tests:
            assert metrics[f"{test.name} tok/s"].estimate.median == statistics.median(test.samples_tok_s)
    assert first.jobs[0].device_entry["connection"]["host"] == "127.0.0.1" and first.jobs[0].cores == [0]
    board_model = first.jobs[0].result
    assert board_model.provenance.command == [str(sshd.python), "-m", "edgeforge.runners.local_worker"]
    assert [r.timed for r in board_model.rounds] == [False] + [True] * ROUNDS and board_model.rounds[1].before

    sessions = []
    monkeypatch.setattr(matrix, "runner_for", lambda device: sessions.append(device.name) or RUNNERS.get(
        device.kind)(device))
    healed = load_farm(_farm(tmp_path, "healed", board1 + sshd.device_table("board2", cpu_mask=[0]) + local))
    second = bench_matrix(artifacts, healed.devices, out, settings=settings, retries=1)
    assert sessions == ["board2"] and not second.failures
    assert second.jobs[:2] == first.jobs[:2] and second.jobs[4:] == first.jobs[2:]
    assert [job.device for job in second.jobs] == ["board1"] * 2 + ["board2"] * 2 + ["here"] * 2
