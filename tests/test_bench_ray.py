"""bench --farm --ray: the matrix of tests/test_bench_matrix.py through a Ray cluster of two simulated lab hosts
(ray.cluster_utils.Cluster), each offering its device as the resource edgeforge-device:<name>. Its jobs are the
thread executor's (same keys, devices, artifacts, tests and sample counts), each session ran on the node owning its
device, a task whose worker dies and a device no host offers are retried then marked failed with the others kept,
and a rerun skips what finished. About 100 s here (cluster start ~17 s, the Ray matrix ~50 s, the thread matrix
~35 s, on two loaded cores): marked slow.

The crashing device's runner is a plugin "installed" on every host (a dist-info on PYTHONPATH, which the hosts' Ray
workers inherit): its worker process exits in the middle of the session.
"""

import json
import os
import statistics
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.cli import main
from edgeforge.runners import RUNNERS
from edgeforge.verify.matrix_ray import device_resource
from edgeforge.verify.matrix_record import BenchMatrix, MatrixJob
from tests.test_bench_matrix import ROUNDS, SETTINGS, first_run  # noqa: F401  (the thread executor's run)

CRASHY_RUNNER = '''
import os


class CrashyRunner:
    """A device whose host's worker process dies as its session starts."""

    name = "crashy"

    def __init__(self, device):
        self.device = device

    def environment(self, *, threads):
        os._exit(1)
'''
FARM = """
[[device]]
name = "alpha"
kind = "local"
labels = { os = "linux" }

[[device]]
name = "beta"
kind = "local"
labels = { os = "linux" }

[[device]]
name = "crashy"
kind = "crashy"
labels = { os = "lab" }

[[device]]
name = "nowhere"
kind = "local"
labels = { os = "lab" }
"""


@pytest.fixture(scope="module")
def ray_hosts(tmp_path_factory):
    """A Ray head with no CPU and two hosts: host A offers alpha, host B offers beta and crashy; the crashy runner's
    plugin is on every process's path. The cluster is shut down after the module."""
    from ray.cluster_utils import Cluster

    site = tmp_path_factory.mktemp("site")
    (site / "crashy_runner.py").write_text(CRASHY_RUNNER)
    dist_info = site / "toyplugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[edgeforge.runners]\ncrashy = crashy_runner:CrashyRunner\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            host_a = cluster.add_node(num_cpus=1, resources={device_resource("alpha"): 1})
            host_b = cluster.add_node(num_cpus=1, resources={device_resource("beta"): 1, device_resource("crashy"): 1})
            with RUNNERS.isolated():
                yield SimpleNamespace(address=cluster.address, nodes={"alpha": host_a.node_id, "beta": host_b.node_id})
        finally:
            cluster.shutdown()
            sys.modules.pop("crashy_runner", None)


@pytest.fixture(scope="module")
def ray_run(ray_hosts, tmp_path_factory, stories_int4):
    tmp_path = tmp_path_factory.mktemp("ray-matrix")
    farm, out, record_path = tmp_path / "farm.toml", tmp_path / "runs", tmp_path / "matrix.json"
    farm.write_text(FARM)
    args = ["bench", str(DEFAULT_CHECKPOINT), str(stories_int4), "--farm", str(farm), "--ray", ray_hosts.address,
            "-o", str(out), "--retries", "1", "--max-cv", "1e-9", "--json", str(record_path), *SETTINGS]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result, BenchMatrix.from_dict(json.loads(record_path.read_text())), out, farm


def _shape(job: MatrixJob) -> tuple:
    return (job.key, job.device, job.artifact.sha256, job.runner, job.prompt_token_ids,
            [(test.name, len(test.samples_tok_s)) for test in job.result.tests])


@pytest.mark.slow
def test_ray_gives_the_jobs_of_the_thread_executor_each_on_the_host_owning_its_device(ray_run, first_run, ray_hosts):
    result, record, out, _ = ray_run
    assert result.exit_code == 3, result.output + result.stderr
    threaded = first_run[1]
    assert [_shape(job) for job in record.jobs] == [_shape(job) for job in threaded.jobs], "same keys, same work"
    assert [job.device for job in record.jobs] == ["alpha", "alpha", "beta", "beta"]
    assert all(line.startswith(("[", "edgeforge: ")) for line in result.stderr.splitlines()), "no Ray noise"
    for device in ("alpha", "beta"):  # (crashy's worker may die before its first message reaches the driver)
        assert result.stderr.count(f"[{device}] session on Ray node {ray_hosts.nodes[device][:12]}") == 1, result.stderr
    assert sorted(path.relative_to(out).parts[1] for path in (out / "jobs").rglob("*.json")) == [
        "alpha", "alpha", "beta", "beta"]
    assert (out / "matrix.html").exists() and "alpha" in (out / "matrix.html").read_text()


@pytest.mark.slow
def test_a_dying_ray_task_and_an_unoffered_device_are_retried_then_failed(ray_run):
    result, record, _, _ = ray_run
    crashy, nowhere = record.failures
    assert (crashy.device, crashy.attempts, nowhere.device, nowhere.attempts) == ("crashy", 2, "nowhere", 2)
    assert crashy.error.startswith("the Ray task of crashy died:"), crashy.error
    assert f"offers {device_resource('nowhere')}: start the one the device is attached to with ray start" \
           in nowhere.error
    assert crashy.artifacts == nowhere.artifacts == [artifact.sha256 for artifact in record.artifacts]
    assert "FAILED crashy after 2 attempt(s), 2 job(s) not run" in result.stdout
    assert result.stderr.splitlines()[-1].startswith("edgeforge: error: crashy, nowhere failed on every attempt")


@pytest.mark.slow
def test_ray_summaries_are_those_of_the_raw_samples_on_disk(ray_run):
    _, record, out, _ = ray_run
    jobs = {(job.device, job.artifact.sha256): job for job in
            (MatrixJob.from_dict(json.loads(path.read_text())) for path in (out / "jobs").rglob("*.json"))}
    assert len(jobs) == len(record.jobs) == len(record.summaries) == 4
    for summary in record.summaries:
        job = jobs[summary.device, summary.artifact]
        metrics = {metric.name: metric for metric in summary.metrics}
        baseline = jobs[summary.device, record.baseline]
        for test in job.result.tests:
            assert len(test.samples_tok_s) == ROUNDS
            assert metrics[f"{test.name} tok/s"].estimate.median == statistics.median(test.samples_tok_s)
        for ratio in summary.ratios:
            test = ratio.name.removesuffix(" tok/s")
            assert ratio.paired and job.session == baseline.session
            assert ratio.estimate.median == statistics.median(
                a / b for a, b in zip(job.result.test(test).samples_tok_s, baseline.result.test(test).samples_tok_s))


@pytest.mark.slow
def test_a_rerun_through_ray_skips_the_finished_jobs(ray_run, ray_hosts, stories_int4):
    _, first, out, farm = ray_run
    written = {path: path.stat().st_mtime_ns for path in (out / "jobs").rglob("*.json")}
    args = ["bench", str(DEFAULT_CHECKPOINT), str(stories_int4), "--farm", str(farm), "--devices", "os=linux",
            "--ray", ray_hosts.address, "-o", str(out), "--json", "-", *SETTINGS]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    record = BenchMatrix.from_dict(json.loads(result.stdout))
    assert record.jobs == first.jobs and all(summary.reused for summary in record.summaries)
    assert "session on Ray node" not in result.stderr, "no session was started"
    assert {path: path.stat().st_mtime_ns for path in (out / "jobs").rglob("*.json")} == written


def test_ray_needs_a_farm():
    result = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), "--ray", "auto"])
    assert result.exit_code == 2 and result.stderr == "edgeforge: error: --ray: only with --farm\n", result.stderr


def test_an_artifact_missing_or_different_on_the_host_is_a_one_line_config_error(tmp_path):
    from edgeforge.errors import ConfigError
    from edgeforge.fileio import content_sha256
    from edgeforge.verify.matrix_ray import _check_artifacts_here
    from edgeforge.verify.bench_models import describe_bench_model
    from edgeforge.verify.matrix_record import MatrixArtifact

    copy = tmp_path / "stories260K"
    copy.mkdir()
    for file in DEFAULT_CHECKPOINT.parent.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    model = describe_bench_model(copy / DEFAULT_CHECKPOINT.name)
    artifact = MatrixArtifact(path=str(model.path), label=model.label, sha256=content_sha256(model.path))
    _check_artifacts_here([(model, artifact)], "f" * 56)  # the same content at the same path: fine
    with pytest.raises(ConfigError, match=f"^{model.path} differs on Ray node ffffffffffff: put the artifacts"):
        _check_artifacts_here([(model, MatrixArtifact(path=artifact.path, label=artifact.label, sha256="0" * 64))],
                              "f" * 56)
    model.path.unlink()
    with pytest.raises(ConfigError, match=f"^{model.path} is missing on Ray node ffffffffffff"):
        _check_artifacts_here([(model, artifact)], "f" * 56)
