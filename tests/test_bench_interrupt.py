"""Ctrl-C in the middle of a farm run: the jobs that finished are on disk, whole, and a rerun reuses them.

A real `edgeforge bench --farm` process: device alpha (this machine) finishes its jobs while device sleepy (a
plugin runner whose models never load) holds the run open; SIGINT then stops it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.verify.matrix_record import BenchMatrix, MatrixJob
from tests.test_bench_matrix import SETTINGS

SLEEPY_RUNNER = '''
import time

from edgeforge.runners.local import LocalRunner


class SleepyRunner(LocalRunner):
    """This machine, but no model ever finishes loading."""

    name = "sleepy"

    def prepare(self, model, environment):
        time.sleep(3600)
'''
FARM = """
[[device]]
name = "alpha"
kind = "local"

[[device]]
name = "sleepy"
kind = "sleepy"
"""


# slow: in one CI run at load ~5 the interrupted process had not exited 60 s after SIGINT, before printing its
# line, while the other device was measuring bandwidth; not understood yet, so not in the fast suite.
@pytest.mark.slow
def test_ctrl_c_keeps_every_finished_job_and_a_rerun_reuses_them(stories_int4, tmp_path):
    site = tmp_path / "site"
    dist_info = site / "toyplugin-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (site / "sleepy_runner.py").write_text(SLEEPY_RUNNER)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[edgeforge.runners]\nsleepy = sleepy_runner:SleepyRunner\n")
    farm, out = tmp_path / "farm.toml", tmp_path / "out"
    farm.write_text(FARM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "edgeforge", "bench", str(DEFAULT_CHECKPOINT), str(stories_int4), "--farm",
               str(farm), "-o", str(out), "--max-cv", "10", *SETTINGS]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while len(list((out / "jobs" / "alpha").glob("*.json"))) < 2:
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "alpha's jobs never appeared"
            time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "edgeforge: interrupted" and "Traceback" not in stderr
    kept = sorted((out / "jobs" / "alpha").glob("*.json"))
    jobs = [MatrixJob.from_dict(json.loads(path.read_text()), path=path) for path in kept]  # whole records
    assert {job.device for job in jobs} == {"alpha"} and len({job.artifact.sha256 for job in jobs}) == 2
    assert not list(out.rglob("*.tmp*")), "nothing half-written is left"

    rerun = subprocess.run([*command, "--devices", "alpha", "--json", "-"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    record = BenchMatrix.from_dict(json.loads(rerun.stdout))
    assert [summary.reused for summary in record.summaries] == [True, True]
    assert sorted(record.jobs, key=lambda job: job.key) == sorted(jobs, key=lambda job: job.key), "as written"
