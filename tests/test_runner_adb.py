"""The adb runner without a phone: command building and output parsing against the output of ExecuTorch's LLM
runner at two releases (v0.4.0: --seq_len; v1.4.0: --max_new_tokens, --ignore_eos, --warmup, --num_bos), the phone's
facts parsed from a recorded shell output, and `edgeforge devices` reporting a missing adb, a serial the adb server
does not see (a fake server speaking adb's wire protocol to the real adbutils client) and a missing runner binary.
tests/data/adb/README.md says where each recorded file came from (reconstructed from the tagged sources: no phone or
arm64 runner build is available here).
"""

import json
import random
import re
import shlex
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeforge.checkpoints.tokenizers import find_tokenizer
from edgeforge.cli import main
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.records import decode
from edgeforge.runners.adb import AdbRunner, fit_prompt, machine_facts
from edgeforge.runners.adb_observer import (load_facts, parse_conditions, parse_facts, parse_observer,
                                            peak_rss_bytes, run_samples, runner_command, runner_flags)
from edgeforge.runners.conditions import Conditions
from edgeforge.runners.farm import load_farm
from edgeforge.verify.machine import Machine
from tests.adb_server import FakeAdbServer

DATA = Path(__file__).parent / "data" / "adb"
RELEASES = ("v0.4.0", "v1.4.0")
COMMON = ["taskset", "f0", "/w/llama_main", "--model_path=/w/model.pte", "--tokenizer_path=/w/tokenizer.json",
          "--prompt=Once upon a time", "--temperature=0"]


def _recorded(release: str, what: str) -> str:
    return (DATA / f"{release}-{what}").read_text()


def _command(release: str, **overrides) -> list[str]:
    arguments = dict(binary="/w/llama_main", model="/w/model.pte", tokenizer="/w/tokenizer.json",
                     prompt="Once upon a time", prompt_tokens=16, decode_tokens=32, threads=4, cores=[4, 5, 6, 7])
    return runner_command(runner_flags(_recorded(release, "llama_main-help.txt")), **{**arguments, **overrides})


def test_help_lists_each_releases_flags_with_their_types():
    old, new = (runner_flags(_recorded(release, "llama_main-help.txt")) for release in RELEASES)
    assert {name: old[name] for name in ("model_path", "tokenizer_path", "prompt", "seq_len", "cpu_threads",
                                         "temperature")} == {"model_path": "string", "tokenizer_path": "string",
                                                             "prompt": "string", "seq_len": "int32",
                                                             "cpu_threads": "int32", "temperature": "double"}
    assert not {"max_new_tokens", "ignore_eos", "warmup", "num_bos"} & set(old)
    assert {name: new[name] for name in ("max_new_tokens", "ignore_eos", "warmup", "num_bos", "num_eos")} == {
        "max_new_tokens": "int32", "ignore_eos": "bool", "warmup": "bool", "num_bos": "int32", "num_eos": "int32"}
    assert old["help"] == new["help"] == "bool"  # gflags' own flags are listed too (wrapped descriptions joined)


def test_command_for_v0_4_sizes_seq_len_for_the_decode_loop():
    # runner.cpp v0.4.0: decode runs while pos < seq_len - 1 from pos = prompt tokens (16 + a BOS): 32 forwards
    assert _command("v0.4.0") == COMMON + ["--seq_len=50", "--cpu_threads=4"]
    assert _command("v0.4.0", decode_tokens=0, prompt_tokens=5, threads=2, cores=[0, 2])[1] == "5"
    assert _command("v0.4.0", decode_tokens=0, prompt_tokens=5)[-2] == "--seq_len=7"


def test_command_for_v1_4_uses_max_new_tokens_and_the_flags_it_has():
    # text_llm_runner.cpp v1.4.0: the prefill makes the first new token, the loop the other max_new_tokens - 1
    assert _command("v1.4.0") == COMMON + ["--max_new_tokens=33", "--cpu_threads=4", "--ignore_eos=true",
                                           "--warmup=true", "--num_bos=0", "--num_eos=0"]


def test_command_refuses_a_binary_that_is_not_the_llm_runner():
    gflags_only = _recorded("v1.4.0", "llama_main-help.txt").split("Flags from /executorch/third-party")[1]
    with pytest.raises(ConfigError, match=r"/w/llama_main has no --model_path, --tokenizer_path, --prompt, "
                                          r"--temperature flag\(s\)"):
        runner_command(runner_flags("  Flags from /executorch/third-party" + gflags_only), binary="/w/llama_main",
                       model="m", tokenizer="t", prompt="p", prompt_tokens=1, decode_tokens=1, threads=1, cores=[0])


@pytest.mark.parametrize("release, load_s, prompt_tokens, prefill_s, decode_s, peak_mib, load_mib", [
    ("v0.4.0", 0.412, 17, 0.041, 0.648, 189.535156, 186.324219),
    ("v1.4.0", 0.396, 16, 0.036, 0.615, 204.644531, 201.871094),
])
def test_observer_output_becomes_samples_and_load_facts(release, load_s, prompt_tokens, prefill_s, decode_s,
                                                        peak_mib, load_mib):
    stdout, stderr = _recorded(release, "run.stdout"), _recorded(release, "run.stderr")
    observation = parse_observer(stdout, stderr=stderr)
    assert (observation.prompt_tokens, observation.generated_tokens, observation.units_per_second) == (
        prompt_tokens, 32, 1000)
    assert observation.load_s == pytest.approx(load_s) and observation.prefill_s == pytest.approx(prefill_s)
    samples = run_samples([observation, observation], observation, 32)
    assert samples.prefill_s == pytest.approx([prefill_s, prefill_s]) and samples.decode_s == pytest.approx(decode_s)
    assert 32 / samples.decode_s == pytest.approx(32 / decode_s)  # bench's tg32: the runner's decode rate
    assert run_samples([observation], observation, 16).decode_s == pytest.approx(decode_s / 2)  # same tok/s
    facts = load_facts(observation, stderr, threads_note="t")
    assert (facts.load_s, facts.import_s, facts.rss_after_import_bytes) == (pytest.approx(load_s), 0.0, 0)
    assert facts.rss_after_load_bytes == int(load_mib * 2**20)
    assert peak_rss_bytes(stderr) == int(peak_mib * 2**20)


def test_a_run_without_the_observer_line_is_refused_with_the_last_stderr_line():
    stderr = _recorded("v1.4.0", "run.stderr").splitlines()[0] + \
        "\nE 00:00:00.402113 executorch:main.cpp:187] Failed to create llama runner\n"
    stdout = _recorded("v1.4.0", "run.stdout").splitlines()[0]
    with pytest.raises(RuntimeFailure, match=r"^/w/llama_main printed no PyTorchObserver line: E 00:00:00.402113 "
                                             r"executorch:main.cpp:187\] Failed to create llama runner$"):
        parse_observer(stdout, stderr=stderr, binary="/w/llama_main")
    truncated = _recorded("v0.4.0", "run.stdout").replace(',"first_token_ms"', ',"first_token"')
    with pytest.raises(RuntimeFailure, match="not the statistics JSON .*KeyError: 'first_token_ms'"):
        parse_observer(truncated)


def test_a_decode_of_no_token_is_refused():
    observation = parse_observer(_recorded("v0.4.0", "run.stdout").replace('"generated_tokens":32',
                                                                          '"generated_tokens":0'))
    with pytest.raises(RuntimeFailure, match="decoded no token"):
        run_samples([observation], observation, 32)


def test_phone_facts_parse_from_the_recorded_shell_output():
    facts = parse_facts((DATA / "pixel8-facts.txt").read_text())
    assert (facts["uid"], facts["rooted"], facts["cpus"]) == (2000, False, 9)
    assert facts["cpufreq"]["policy4"] == {"cpus": [4, 5, 6, 7], "governor": "sched_pixel", "cur_khz": 2401000,
                                           "max_khz": 2401000}
    assert list(facts["cpufreq"]) == ["policy0", "policy4", "policy8"]
    assert facts["time_in_state"]["policy8"] == {"500000": 2050112, "2912000": 22011}
    assert facts["thermal"][0] == {"zone": "thermal_zone0", "type": "BIG", "temp_c": 41.25}
    assert facts["thermal"][-1] == {"zone": "thermal_zone11", "type": "skin-virt", "temp_c": None}  # unreadable
    assert [zone["zone"] for zone in facts["thermal"]][-2:] == ["thermal_zone10", "thermal_zone11"]
    assert facts["battery"] == {"level": 85, "temperature_c": 29.3, "status": "2", "powered": ["USB"]}
    assert facts["screen"] == {"wakefulness": "Awake", "display": "ON"}
    assert (facts["memory_total_bytes"], facts["load_average_1m"]) == (7801608 * 1024, 2.41)
    assert facts["cpu_model"] == "4x Cortex-A510 + 4x Cortex-A715 + 1x Cortex-X3"
    rooted = (DATA / "pixel8-facts.txt").read_text().replace("timeout: exec su: No such file or directory",
                                                             "uid=0(root) gid=0(root) context=u:r:magisk:s0")
    assert parse_facts(rooted)["rooted"] is True


def test_phone_facts_make_a_machine_and_its_conditions_a_bench_conditions_record():
    output = (DATA / "pixel8-facts.txt").read_text()
    machine = Machine(**machine_facts(parse_facts(output), threads=4, usable_cpus=4))
    assert machine.cpu_model == "Tensor G3 (Google Pixel 8)"
    assert machine.os == "Android 14 (google/shiba/shiba:14/AP2A.240805.005/12025142:user/release-keys)"
    assert (machine.governor, machine.cur_freq_khz, machine.logical_cpus) == ("sched_pixel", 1197000, 9)
    assert machine.device_facts["battery"]["level"] == 85
    conditions = decode(Conditions, parse_conditions(output, time_s=5.0), where="conditions")
    assert conditions.hottest_c == 41.25 and len(conditions.temperatures) == 5
    assert conditions.frequencies_khz == {"policy0": 1197000, "policy4": 2401000, "policy8": 2912000}
    assert conditions.load_average == [2.41, 2.10, 1.87] and conditions.temperature_note is None
    unreadable = decode(Conditions, parse_conditions("@@edgeforge:thermal\n/sys/class/thermal/thermal_zone0/type:BIG\n",
                                                     time_s=5.0), where="conditions")
    assert unreadable.hottest_c is None and "none readable" in unreadable.temperature_note


def test_prompt_ids_are_fitted_to_a_text_of_as_many_tokens(shared):
    tokenizer = find_tokenizer(shared / "models" / "stories260K", vocab_size=512)
    rng = random.Random(0)  # random ids decode to byte tokens that are no character: the fitting must cope
    for length in (1, 4, 16, 64, 256) * 3:
        text = fit_prompt(tokenizer, [rng.randrange(512) for _ in range(length)])
        assert len(tokenizer.encode(text, add_special_tokens=False)) == length, text


# ---- edgeforge devices ----

FARM = """
[[device]]
name = "pixel"
kind = "adb"
labels = {{ os = "android" }}
serial = "38121FDJH00CLK"
runner = "{runner}"
adb_port = {port}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _devices(tmp_path, monkeypatch, port: int, *, runner: str = "llama_main", strict: bool = False):
    (tmp_path / "llama_main").write_bytes(b"\x7fELF")
    (tmp_path / "farm.toml").write_text(FARM.format(runner=runner, port=port))
    (tmp_path / "bin").mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no adb on PATH (none is installed here either)
    return CliRunner().invoke(main, ["devices", "--farm", str(tmp_path / "farm.toml")] + ["--strict"] * strict,
                              catch_exceptions=False)


def test_devices_reports_a_missing_adb_in_one_line(tmp_path, monkeypatch):
    port = _free_port()
    result = _devices(tmp_path, monkeypatch, port)
    assert result.exit_code == 0, result.output
    line = (f"pixel   adb   os=android  NOT READY: device 'pixel' (adb serial 38121FDJH00CLK): adb: not found on PATH "
            f"and no adb server answers at 127.0.0.1:{port}; install Android platform-tools")
    assert result.output.splitlines()[1] == line
    strict = _devices(tmp_path, monkeypatch, port, strict=True)
    assert strict.exit_code == 3 and "not reachable or not checked: pixel" in strict.output


def test_devices_names_a_serial_the_adb_server_does_not_see(tmp_path, monkeypatch):
    server = FakeAdbServer("R58M12ABCDE\tdevice\nemulator-5554\tunauthorized\n")
    try:
        result = _devices(tmp_path, monkeypatch, server.port)
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].endswith(
        f"NOT READY: device 'pixel' (adb serial 38121FDJH00CLK): is not attached to the adb server at "
        f"127.0.0.1:{server.port}; it sees R58M12ABCDE (device), emulator-5554 (unauthorized)")


def test_devices_names_a_missing_runner_binary(tmp_path, monkeypatch):
    result = _devices(tmp_path, monkeypatch, _free_port(), runner="build/llama_main")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].endswith(
        f"NOT READY: device 'pixel' (adb serial 38121FDJH00CLK): the runner binary "
        f"{tmp_path}/build/llama_main does not exist (build ExecuTorch's llama_main for arm64 and name it in the "
        "farm file)")


def test_prepare_refuses_a_model_that_is_not_a_pte(tmp_path, monkeypatch):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT
    from edgeforge.verify.bench_models import describe_bench_model

    (tmp_path / "llama_main").write_bytes(b"\x7fELF")
    (tmp_path / "farm.toml").write_text(FARM.format(runner="llama_main", port=_free_port()))
    runner = AdbRunner(load_farm(tmp_path / "farm.toml").devices[0])
    with pytest.raises(ConfigError, match=r"stories260K.bin: the adb runner runs only .pte artifacts .*this "
                                          r"model's format is 'eager'$"):
        runner.prepare(describe_bench_model(DEFAULT_CHECKPOINT), None)


def test_bench_accepts_a_runner_that_measures_no_bandwidth():
    """The adb runner's measure_bandwidth returns None: bench records no ceiling and says why, instead of failing."""
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT
    from edgeforge.runners import RUNNERS
    from edgeforge.runners.local import LocalRunner
    from edgeforge.verify.bench import BenchSettings, bench, format_bench
    from edgeforge.verify.bench_record import BenchReport

    class UnmeasuredRunner(LocalRunner):
        name = "unmeasured"

        def measure_bandwidth(self, environment, *, repetitions, size_bytes, probe_bytes):
            return None

    with RUNNERS.isolated():
        RUNNERS.register(UnmeasuredRunner)
        record = bench(DEFAULT_CHECKPOINT, runner="unmeasured", settings=BenchSettings(
            prompt_lengths=(4,), decode_tokens=2, repetitions=1, warmup=0, threads=1))
    assert record.bandwidth is None and record.models[0].ceiling is None
    assert "bandwidth: the unmeasured runner cannot measure it, so no decode ceiling is set" in record.caveats
    assert "  ceiling  none: the device's bandwidth was not measured" in format_bench(record).splitlines()
    again = BenchReport.from_dict(record.to_dict())
    assert again.bandwidth is None and again.models[0].ceiling is None


@pytest.mark.parametrize("change, problem", [
    (("adb_port = 1", 'workdir = "tmp/x"'), "workdir must be an absolute path on the device, got 'tmp/x'"),
    (('serial = "38121FDJH00CLK"', 'serial = ""'), "serial must be a non-empty string, got ''"),
    (("adb_port = 1", "adb_port = 0"), "adb_port must be an integer in 1..65535, got 0"),
    (("adb_port = 1", 'python = "/usr/bin/python3"'), "unknown key(s) python for kind 'adb' (allowed: "),
])
def test_a_bad_adb_entry_is_a_one_line_error_naming_the_farm(tmp_path, change, problem):
    (tmp_path / "farm.toml").write_text(FARM.format(runner="llama_main", port=1).replace(*change))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path}/farm.toml: device 'pixel': {problem}")):
        load_farm(tmp_path / "farm.toml")


# ---- a whole matrix job through adbutils and a stand-in phone ----

class Phone:
    """The phone behind FakeAdbServer: its shell answers the runner's commands, and llama_main of ``release`` prints
    its recorded output with the token counts its flags imply (the timestamps are the recording's)."""

    def __init__(self, server: FakeAdbServer, release: str, tokenizer):
        self.server, self.release, self.tokenizer = server, release, tokenizer

    def __call__(self, command: str) -> tuple[str, str, int]:
        from edgeforge.runners.adb_observer import CONDITIONS_SCRIPT, FACTS_SCRIPT

        words = shlex.split(command)
        if command in (FACTS_SCRIPT, CONDITIONS_SCRIPT):
            return (DATA / "pixel8-facts.txt").read_text(), "", 0
        if words[0] == "test":
            return "", "", 0 if words[2] in self.server.files else 1
        if words[0] == "echo":  # the push's marker
            self.server.files[words[-1]] = (0o100644, command.encode())
            return "", "", 0
        if words[0] in ("mkdir", "uname"):
            return "Linux\nlocalhost\n5.15.137\n#1 SMP PREEMPT\naarch64\n" * (words[0] == "uname"), "", 0
        binary = words[2] if words[0] == "taskset" else words[0]
        if binary not in self.server.files:
            return "", f"/system/bin/sh: {binary}: inaccessible or not found\n", 127
        if words[1] == "--help":
            return _recorded(self.release, "llama_main-help.txt"), "", 1
        return self._llama_main(dict(word[2:].split("=", 1) for word in words[3:]))

    def _llama_main(self, flags: dict) -> tuple[str, str, int]:
        prompt_tokens = len(self.tokenizer.encode(flags["prompt"], add_special_tokens=False))
        if "max_new_tokens" in flags:  # v1.4: num_bos=0; the loop makes max_new_tokens - 1
            generated = int(flags["max_new_tokens"]) - 1
        else:  # v0.4: the model's BOS, and the loop runs to seq_len - 1
            prompt_tokens += 1
            generated = int(flags["seq_len"]) - 1 - prompt_tokens
        stdout = _recorded(self.release, "run.stdout")
        line = next(line for line in stdout.splitlines() if line.startswith("PyTorchObserver "))
        stats = {**json.loads(line.removeprefix("PyTorchObserver ")), "prompt_tokens": prompt_tokens,
                 "generated_tokens": generated}
        return stdout.replace(line, "PyTorchObserver " + json.dumps(stats)), _recorded(self.release, "run.stderr"), 0


@pytest.fixture(scope="module")
def stories_pte(tmp_path_factory):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT
    from edgeforge.export import export

    return export(DEFAULT_CHECKPOINT, "android-arm64-xnnpack", tmp_path_factory.mktemp("pte") / "stories.pte.d",
                  max_seq_len=64, check=False).path


@pytest.mark.slow  # the .pte export takes a minute or two here
@pytest.mark.parametrize("release, prefill_s, decode_s, load_s, run_flag", [
    ("v0.4.0", 0.041, 0.648, 0.412, "--seq_len="),
    ("v1.4.0", 0.036, 0.615, 0.396, "--max_new_tokens=5"),
])
def test_a_matrix_job_runs_through_adb_on_the_stand_in_phone(tmp_path, stories_pte, release, prefill_s, decode_s,
                                                             load_s, run_flag):
    from edgeforge.fileio import content_sha256
    from edgeforge.verify.bench import BenchSettings
    from edgeforge.verify.matrix import bench_matrix

    server = FakeAdbServer("38121FDJH00CLK\tdevice\n")
    server.shell = Phone(server, release, find_tokenizer(Path(stories_pte), vocab_size=512))
    try:
        (tmp_path / "llama_main").write_bytes(b"\x7fELF arm64 llama_main " + release.encode())
        (tmp_path / "farm.toml").write_text(FARM.format(runner="llama_main", port=server.port)
                                            + "cpu_mask = [4, 5, 6, 7]\n")
        device = load_farm(tmp_path / "farm.toml").devices[0]
        record = bench_matrix([stories_pte], [device], tmp_path / "out", retries=0, settings=BenchSettings(
            prompt_lengths=(4, 8), decode_tokens=4, repetitions=2, warmup=0))
        pushed = dict(server.files)
        AdbRunner(device).push(AdbRunner(device).connect(), Path(stories_pte))  # a second session: nothing pushed
    finally:
        server.close()
    assert not record.failures, record.failures
    job, summary = record.jobs[0], record.summaries[0]
    assert (job.runner, job.threads, job.cores, job.bandwidth, summary.ceiling_share) == ("adb", 4, [4, 5, 6, 7],
                                                                                          None, None)
    result = job.result
    assert [test.samples_s for test in result.tests] == [[pytest.approx(prefill_s)] * 2] * 2 + [
        [pytest.approx(decode_s)] * 2]  # pp4, pp8 (the recording's timings), tg4: 4 of its decode forwards
    assert result.test("tg4").tok_s.median == pytest.approx(4 / decode_s)
    assert (result.load_s, result.import_s) == (pytest.approx(load_s), 0.0)
    assert result.peak_rss_bytes == peak_rss_bytes(_recorded(release, "run.stderr")) > 0
    assert job.machine.cpu_model == "Tensor G3 (Google Pixel 8)" and job.machine.device_facts["rooted"] is False
    assert all(round_.before.hottest_c == 41.25 and round_.after.governors["policy4"] == "sched_pixel"
               for round_ in result.rounds)
    assert result.provenance.runner_sha256 == content_sha256(tmp_path / "llama_main")
    runs = [command for command in server.commands if command.startswith("taskset f0 ")]
    assert len(runs) == 1 + 2 * 2  # load; then per round pp4 (which also decodes: it is the decode context), pp8
    assert sum(run_flag in command and "--cpu_threads=4" in command for command in runs) >= 2
    assert sum(command.endswith(" --help") for command in server.commands) == 1
    folder = next(path for path in pushed if path.endswith("/llama_main")).rsplit("/", 1)[0]
    assert folder == f"/data/local/tmp/edgeforge/{content_sha256(Path(stories_pte), tmp_path / 'llama_main')}"
    assert pushed[f"{folder}/llama_main"][0] == 0o100755 and f"{folder}/model.pte" in pushed
    assert pushed[f"{folder}/model.pte"][1] == (Path(stories_pte) / "model.pte").read_bytes()
    assert server.files == pushed, "the second session found the push complete"
