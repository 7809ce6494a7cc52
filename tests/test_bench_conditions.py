"""Numbers that can be trusted: a hung worker is stopped at its deadline (locally and over SSH), every sample records
the device's conditions around it and what measured it, warm-up runs by count and by time, the cooldown and the
temperature gate wait before each timed sample and say what they found.

Runs are tiny (stories260K fp32, short prompts, 1 thread): they check the record and the decisions, not speed.
"""

import json
import os
import platform
import signal
import statistics
import sys
import time

import pytest
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.cli import main
from edgeforge.errors import RuntimeFailure
from edgeforge.fileio import content_sha256
from edgeforge.records import decode, encode
from edgeforge.runners import Workload
from edgeforge.runners.conditions import (Conditions, package_sha256, read_conditions, wait_for_temperature)
from edgeforge.runners.farm import load_farm, runner_for
from edgeforge.runners.local import CALL_FLOOR_S, RUN_MULTIPLE, RUN_S_PER_TOKEN
from edgeforge.verify.bench import BenchSettings
from edgeforge.verify.bench_record import BenchReport
from edgeforge.verify.bench_models import describe_bench_model
from tests.test_runner_ssh import sshd  # noqa: F401  (the real sshd fixture)

TINY = ["--prompt-lengths", "4,8", "--decode-tokens", "4", "-t", "1", "--bandwidth-mib", "32"]


def _farm(tmp_path, text: str):
    path = tmp_path / "farm.toml"
    path.write_text(text)
    return path


# ---- per-call deadlines ----

def test_run_deadlines_follow_the_workload_and_a_stopped_worker_is_killed_at_its_deadline(tmp_path):
    device = load_farm(_farm(tmp_path, '[[device]]\nname = "here"\nkind = "local"\n')).devices[0]
    runner = runner_for(device)
    workload = Workload(prompts=[[1, 2, 3], [1, 2, 3, 4, 5]], decode_context=[1, 2, 3], decode_tokens=4)
    arguments = {"prompts": workload.prompts, "decode_context": workload.decode_context, "decode_tokens": 4}
    with runner.prepare(describe_bench_model(DEFAULT_CHECKPOINT), runner.environment(threads=1)) as prepared:
        process, channel = prepared.worker.process, prepared.worker.channel
        assert channel.deadline_s("run", arguments) == CALL_FLOOR_S + RUN_S_PER_TOKEN * (3 + 5 + 3 + 4)
        assert channel.deadline_s("load", {}) == 1800 and channel.deadline_s("setup", {}) == CALL_FLOOR_S
        prepared.load()
        prepared.run(workload)
        slowest = channel.slowest_run_s
        assert 0 < slowest < 60
        assert channel.deadline_s("run", arguments) == CALL_FLOOR_S + RUN_MULTIPLE * slowest

        channel.timeout_s = 1.5  # what a farm entry's timeout_s sets (its parsing: the ssh test below)
        os.kill(process.pid, signal.SIGSTOP)  # the worker stops answering, as a hung device does
        start = time.monotonic()
        with pytest.raises(RuntimeFailure) as hung:
            prepared.run(workload)
        waited = time.monotonic() - start
        assert process.wait(timeout=5) == -signal.SIGKILL, "the hung worker was killed, not left behind"
    assert 1.5 <= waited < 5, waited
    message = str(hung.value)
    assert "\n" not in message
    assert message.startswith("the bench process for stories260K.bin fp32 on here did not answer run within 1.5 s "
                              "(waited 1."), message
    assert message.endswith("s): stopped it (the device entry's timeout_s sets the limit)"), message


def test_a_silent_ssh_device_is_one_not_ready_line_and_a_failed_matrix_job(sshd, tmp_path):  # noqa: F811
    silent = tmp_path / "silent-python"
    silent.write_text("#!/bin/sh\nexec cat > /dev/null\n")  # reads every request, never answers
    silent.chmod(0o755)
    farm = _farm(tmp_path, sshd.device_table("mute", python=str(silent), timeout_s=1))
    start = time.monotonic()
    result = CliRunner().invoke(main, ["devices", "--farm", str(farm)], catch_exceptions=False)
    assert result.exit_code == 0 and time.monotonic() - start < 10, result.output + result.stderr
    row = result.stdout.splitlines()[1]
    assert row.split()[:5] == ["mute", "ssh", "-", "NOT", "READY:"], row
    assert row.endswith("the bench process for the device check on mute did not answer probe within 1 s (waited "
                        + row.split("(waited ")[1].split(" s)")[0] + " s): stopped it (the device entry's timeout_s "
                        "sets the limit)"), row

    out = tmp_path / "runs"
    bench = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), "--farm", str(farm), "-o", str(out),
                                      "--retries", "0", "-r", "1", *TINY], catch_exceptions=False)
    assert bench.exit_code == 3, bench.output + bench.stderr
    assert "FAILED mute after 1 attempt(s), 1 job(s) not run: the bench process for the device facts on mute did " \
           "not answer environment within 1 s" in bench.stdout, bench.stdout
    assert not (out / "jobs").exists()


# ---- conditions ----

def _sysfs(root, zones: dict, policies: dict):
    """A /sys tree under ``root``: thermal zones {name: (type, millidegrees or None for unreadable)} and cpufreq
    policies {name: (governor, kHz)}."""
    for name, (kind, milli) in zones.items():
        folder = root / "sys/class/thermal" / name
        folder.mkdir(parents=True)
        (folder / "type").write_text(kind + "\n")
        if milli is None:
            (folder / "temp").mkdir()  # reading it fails, as an unreadable zone does
        else:
            (folder / "temp").write_text(f"{milli}\n")
    for name, (governor, khz) in policies.items():
        folder = root / "sys/devices/system/cpu/cpufreq" / name
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text(governor + "\n")
        (folder / "scaling_cur_freq").write_text(f"{khz}\n")


def test_conditions_read_zones_and_policies_and_say_why_when_there_are_none(tmp_path):
    _sysfs(tmp_path / "phone", {"thermal_zone10": ("cpu-1-0", 71500), "thermal_zone2": ("battery", 30100),
                                "thermal_zone3": ("gpu", None)},
           {"policy0": ("schedutil", 1804800), "policy4": ("performance", 2419200)})
    found = read_conditions(tmp_path / "phone")
    assert [(z.zone, z.type, z.celsius) for z in found.temperatures] == [
        ("thermal_zone2", "battery", 30.1), ("thermal_zone10", "cpu-1-0", 71.5)], "numeric order, unreadable skipped"
    assert found.hottest_c == 71.5 and found.temperature_note is None
    assert found.governors == {"policy0": "schedutil", "policy4": "performance"}
    assert found.frequencies_khz == {"policy0": 1804800, "policy4": 2419200} and found.cpufreq_note is None
    assert len(found.load_average) == 3 and abs(found.time_s - time.time()) < 5
    assert decode(Conditions, json.loads(json.dumps(encode(found))), where="test") == found, "a record: round trip"

    bare = read_conditions(tmp_path / "vm")
    assert bare.temperatures == [] and bare.hottest_c is None and bare.governors == {}
    assert bare.temperature_note == f"{tmp_path / 'vm/sys/class/thermal'} has no thermal zones (common in VMs)"
    assert bare.cpufreq_note.startswith(f"{tmp_path / 'vm/sys/devices/system/cpu/cpufreq'} has no readable policies")
    _sysfs(tmp_path / "locked", {"thermal_zone0": ("cpu", None)}, {})
    assert read_conditions(tmp_path / "locked").temperature_note.startswith("no thermal zone could be read "
                                                                            "(thermal_zone0: ")


def test_temperature_gate_waits_until_under_up_to_its_limit_and_says_what_it_found(tmp_path):
    _sysfs(tmp_path, {"thermal_zone0": ("cpu", 80000), "thermal_zone1": ("skin", 40000)}, {})
    temp = tmp_path / "sys/class/thermal/thermal_zone0/temp"
    now = [0.0]

    def cooling_sleep(seconds):  # the device cools 4 °C per second slept
        now[0] += seconds
        temp.write_text(f"{80000 - int(4000 * now[0])}\n")

    found, waited = wait_for_temperature(lambda: read_conditions(tmp_path), 70, 60, sleep=cooling_sleep,
                                         clock=lambda: now[0])
    assert waited == 3.0 and found == "under: 68.0 °C < 70 °C after 3.0 s", found  # 80, 76, 72, 68

    temp.write_text("90000\n")
    now[0] = 0.0
    found, waited = wait_for_temperature(lambda: read_conditions(tmp_path), 50, 2.5,
                                         sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert waited == 2.5 and found == "limit reached: 90.0 °C >= 50 °C after 2.5 s (limit 2.5 s); sampled anyway"

    found, waited = wait_for_temperature(lambda: read_conditions(tmp_path / "vm"), 50, 60, sleep=pytest.fail)
    assert found == f"unreadable: {tmp_path / 'vm/sys/class/thermal'} has no thermal zones (common in VMs)"


def test_bench_records_conditions_provenance_warmup_by_time_cooldown_and_gate(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", str(DEFAULT_CHECKPOINT), *TINY, "-r", "3", "--warmup", "1", "--warmup-s", "0.4",
            "--cooldown-s", "0.05", "--max-temp-c", "50", "--max-temp-wait-s", "2", "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    record = BenchReport.from_dict(json.loads(out.read_text()))
    settings, [model] = record.settings, record.models
    assert (settings.warmup_s, settings.cooldown_s, settings.max_temp_c, settings.max_temp_wait_s) == (0.4, 0.05, 50, 2)

    warm = [r for r in model.rounds if not r.timed]
    timed = [r for r in model.rounds if r.timed]
    assert model.rounds == warm + timed and len(timed) == 3 == len(model.tests[0].samples_s)
    assert warm[-1].after.time_s - warm[0].before.time_s >= 0.4 - 0.05, "warm-up lasted its seconds"
    if len(warm) > 1:
        assert warm[-2].after.time_s - warm[0].before.time_s < 0.4, "and stopped once both were reached"
    assert all(r.cooldown_s == 0 and r.gate is None and r.gate_wait_s == 0 for r in warm)
    here = read_conditions()
    for index, (previous, sample) in enumerate(zip(model.rounds[len(warm) - 1:], timed)):
        assert sample.cooldown_s == 0.05 and sample.before.time_s - previous.after.time_s >= 0.05
        if here.hottest_c is None:  # this machine has no readable zone: said, never waited for
            assert sample.gate == f"unreadable: {here.temperature_note}" and sample.gate_wait_s < 1
            assert sample.before.hottest_c is None and sample.before.temperature_note == here.temperature_note
        else:
            assert sample.gate.startswith(("under: ", "limit reached: ")) and sample.gate_wait_s <= 2 + 1
        assert sample.before.time_s < sample.after.time_s and len(sample.before.load_average) == 3
        assert sample.seconds >= sum(test.samples_s[index] for test in model.tests), "the run call holds the sample"
    [line] = [line for line in result.stdout.splitlines() if line.startswith("  rounds   ")]
    assert line.startswith(f"  rounds   {len(warm)} warm-up (") and "; 3 timed; cooldown 0.05 s before each; " in line
    if here.hottest_c is None:
        assert line.endswith(f"temperature unreadable: {here.temperature_note} (so the temperature gate could not "
                             "apply)"), line
    else:
        assert "; hottest zone at sample start " in line and "; gate waited " in line, line
    provenance = model.provenance
    assert provenance.artifact_sha256 == content_sha256(DEFAULT_CHECKPOINT)
    assert provenance.runner_sha256 == package_sha256() and "edgeforge package" in provenance.runner_basis
    assert provenance.command == [sys.executable, "-m", "edgeforge.runners.local_worker"]
    assert provenance.threads == 1 and provenance.cores == settings.cores
    assert provenance.uname["machine"] == platform.machine() and provenance.uname["node"] == platform.node()
    assert statistics.median(model.decode_test.samples_s) > 0


def test_job_keys_of_default_settings_are_those_written_before_pacing_existed():
    import hashlib

    from edgeforge.runners.farm import Device
    from edgeforge.verify.matrix import job_key

    device = Device(name="pi5", kind="ssh", threads=2, cpu_mask=(0, 1))
    settings = BenchSettings(prompt_lengths=(4, 8), repetitions=3)
    before = {"prompt_lengths": [4, 8], "decode_tokens": 32, "repetitions": 3, "warmup": 1, "threads": None,
              "bandwidth_bytes": None, "seed": 0}  # BenchSettings' fields when the first jobs were written
    text = json.dumps({"artifact": "ab" * 32, "device": "pi5", "settings": before, "kind": "ssh", "threads": 2,
                       "cpu_mask": [0, 1]}, sort_keys=True)
    assert job_key("ab" * 32, device, settings) == hashlib.sha256(text.encode()).hexdigest()
    paced = BenchSettings(prompt_lengths=(4, 8), repetitions=3, cooldown_s=1.0)
    assert job_key("ab" * 32, device, paced) != job_key("ab" * 32, device, settings), "a paced run is another job"



def test_a_bad_timeout_in_the_farm_file_is_one_line(tmp_path):
    path = _farm(tmp_path, '[[device]]\nname = "x"\nkind = "local"\ntimeout_s = 0\n')
    result = CliRunner().invoke(main, ["devices", "--farm", str(path)])
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr == f"edgeforge: error: {path}: device 'x': timeout_s must be a positive number of seconds, " \
                            "got 0\n"


def test_an_ssh_device_reports_its_own_conditions_and_the_remote_command(sshd, tmp_path):  # noqa: F811
    device = load_farm(_farm(tmp_path, sshd.device_table("board", cpu_mask=[0]))).devices[0]
    runner = runner_for(device)
    environment = runner.environment(threads=None)
    sshd.requests_log.unlink(missing_ok=True)
    with runner.prepare(describe_bench_model(DEFAULT_CHECKPOINT), environment) as prepared:
        identity, conditions = prepared.identity(), prepared.conditions()
    assert identity["command"] == [str(sshd.python), "-m", "edgeforge.runners.local_worker"], "the remote command"
    assert identity["runner_sha256"] == package_sha256() and identity["uname"]["machine"] == platform.machine()
    assert decode(Conditions, conditions, where="test").temperature_note == read_conditions().temperature_note
    assert [r["op"] for r in sshd.requests()] == ["setup", "identity", "conditions"], "asked of the remote worker"
