"""The farm file, the ``ssh`` runner against a real OpenSSH server, and ``edgeforge devices``.

The server is Debian's ``sshd`` on 127.0.0.1 on a free port, with a throwaway host key and user key made here,
started in the foreground (``-D``) from a config file of its own and stopped by its PID. The "remote" Python is
this one behind a wrapper that copies every request it receives to a log, so a test can see what the worker
was asked over SSH (the remote path it loads, the environment request).
"""

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.runners import Workload
from edgeforge.runners.farm import default_device, load_farm, runner_for
from edgeforge.runners.ssh import UPLOADED

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    """A running test sshd: where it listens and the files a farm's ssh device needs to reach it."""

    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    python: Path  # this interpreter behind a wrapper that logs the requests to ``requests_log``
    requests_log: Path
    workdir: Path
    folder: Path

    def device_table(self, name: str, **overrides) -> str:
        """A ``[[device]]`` table reaching this server."""
        fields = {"name": name, "kind": "ssh", "host": "127.0.0.1", "port": self.port, "user": self.user,
                  "identity_file": str(self.identity_file), "known_hosts": str(self.known_hosts),
                  "python": str(self.python), "workdir": str(self.workdir), **overrides}
        return "[[device]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items()
                                        if not isinstance(value, dict)) + \
            "".join(f"{key} = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in value.items())} }}\n"
                    for key, value in fields.items() if isinstance(value, dict)) + "\n"

    def requests(self) -> list[dict]:
        lines = self.requests_log.read_text().splitlines() if self.requests_log.exists() else []
        return [json.loads(line) for line in lines]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 for this test session, key auth only; stopped by its PID at the end."""
    if not Path(SSHD).is_file():
        pytest.fail(f"{SSHD} is missing: apt-get install -y openssh-server (the README's test command does)")
    folder = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(folder / "host_key").split()
    user_key = _keygen(folder / "user_key")
    (folder / "authorized_keys").write_text(user_key + "\n")
    port = _free_port()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (folder / "sshd_config").write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {folder / 'host_key'}
        PidFile {folder / 'sshd.pid'}
        AuthorizedKeysFile {folder / 'authorized_keys'}
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PermitRootLogin prohibit-password
        Subsystem sftp internal-sftp
        """))
    log = folder / "requests.jsonl"
    wrapper = folder / "remote-python"
    wrapper.write_text(f"#!/bin/sh\ntee -a {log} | exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd wants its privilege-separation folder
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "w"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.1)
        yield Sshd(port=port, user=getpass.getuser(), identity_file=folder / "user_key",
                   known_hosts=folder / "known_hosts", python=wrapper, requests_log=log, workdir=folder / "remote",
                   folder=folder)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _farm(tmp_path, text: str) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(text)
    return path


# ---- the farm file ----

def test_farm_loads_devices_resolves_paths_and_selects_by_labels_or_name(tmp_path):
    path = _farm(tmp_path, textwrap.dedent("""\
        [[device]]
        name = "here"
        kind = "local"
        labels = { os = "linux", soc = "x86" }
        threads = 1
        cpu_mask = [0]

        [[device]]
        name = "pi5"
        kind = "ssh"
        labels = { os = "linux", soc = "bcm2712" }
        host = "pi5.lab"
        user = "bench"
        identity_file = "keys/pi5"
        known_hosts = "/etc/lab/known_hosts"
        python = "/opt/venv/bin/python"
        workdir = "/var/tmp/edgeforge"
        """))
    farm = load_farm(path)
    here, pi5 = farm.devices
    assert (here.kind, here.threads, here.cpu_mask, here.connection) == ("local", 1, (0,), None)
    assert pi5.connection.identity_file == tmp_path / "keys" / "pi5", "relative to the farm file"
    assert pi5.connection.known_hosts == Path("/etc/lab/known_hosts") and pi5.connection.port == 22
    assert [d.name for d in farm.select("os=linux")] == ["here", "pi5"]
    assert [d.name for d in farm.select("os=linux, soc=bcm2712")] == ["pi5"]
    assert [d.name for d in farm.select("here")] == ["here"] == [d.name for d in farm.select("kind=local")]
    with pytest.raises(ConfigError, match=r"farm.toml: no device matches 'soc=sm8650'; devices: here \(local; "):
        farm.select("soc=sm8650")
    assert pi5.to_dict()["connection"]["identity_file"] == str(tmp_path / "keys" / "pi5")
    json.dumps(pi5.to_dict())


@pytest.mark.parametrize("table, message", [
    ('name = "x"\nkind = "telnet"\n', r"device 'x': unknown runner kind 'telnet'; known: adb, (.+, )?local, ssh"),
    ('name = "x"\nkind = "adb"\n', r"device 'x': missing serial, runner \(kind 'adb' needs serial, runner\)"),
    ('name = "x"\nkind = "ssh"\nhost = "h"\n', r"device 'x': missing user, identity_file, known_hosts, python, "
                                               r"workdir \(kind 'ssh' needs host, user, "),
    ('name = "x"\nkind = "local"\nhost = "h"\n', r"device 'x': unknown key\(s\) host for kind 'local'"),
    ('name = "x"\nkind = "local"\nthreads = 0\n', r"device 'x': threads must be a positive integer, got 0"),
    ('name = "x"\nkind = "local"\ncpu_mask = "0-3"\n', r"device 'x': cpu_mask must be a non-empty list of CPU ids"),
    ('kind = "local"\n', r"device #1 has no name"),
    ('name = "x"\nkind = "local"\n\n[[device]]\nname = "x"\nkind = "local"\n', r"device 'x' is named twice"),
])
def test_bad_farm_file_is_one_line_naming_the_file_and_the_device(tmp_path, table, message):
    path = _farm(tmp_path, "[[device]]\n" + table)
    result = CliRunner().invoke(main, ["devices", "--farm", str(path)])
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"edgeforge: error: {path}: "), result.stderr
    assert __import__("re").search(message, result.stderr), result.stderr


def test_ssh_runner_without_a_farm_device_is_refused():
    with pytest.raises(ConfigError, match="the ssh runner needs a device from a farm file"):
        runner_for(default_device("ssh"))


# ---- the ssh runner ----

@pytest.fixture(scope="module")
def tiny_onnx(stories_int4, tmp_path_factory):
    from edgeforge.export import export

    directory = tmp_path_factory.mktemp("ssh-artifact") / "stories.onnx.d"
    export(stories_int4, "onnx-cpu", directory, max_seq_len=32, check=False)
    return directory


def test_ssh_runner_measures_remotely_and_uploads_once(sshd, tmp_path, tiny_onnx):
    from edgeforge.fileio import content_sha256
    from edgeforge.verify.bench_models import describe_bench_model

    device = load_farm(_farm(tmp_path, sshd.device_table("board", cpu_mask=[0], labels={"os": "linux"}))).devices[0]
    runner = runner_for(device)
    assert runner.name == "ssh" and runner.device is device
    sshd.requests_log.unlink(missing_ok=True)
    environment = runner.environment(threads=None)
    assert environment.threads == 1 and environment.cores == [0], "the device's cpu_mask, applied there"
    assert environment.machine["python"] and environment.machine["versions"]["onnxruntime"]
    bandwidth = runner.measure_bandwidth(environment, repetitions=2, size_bytes=16 * 2**20, probe_bytes=(10**5,))
    assert len(bandwidth.read_samples_gb_s) == 2 and bandwidth.ceiling_gb_s > 0

    model = describe_bench_model(tiny_onnx)
    workload = Workload(prompts=[[1, 2, 3, 4]], decode_context=[1, 2, 3, 4], decode_tokens=3)
    remote = sshd.workdir / content_sha256(tiny_onnx)
    for attempt in range(2):
        with runner.prepare(model, environment) as prepared:
            facts = prepared.load()
            samples = [prepared.run(workload) for _ in range(2)]
            peak = prepared.finish()
        assert facts.load_s > 0 and "CPU affinity [0]" in facts.threads_note
        assert all(len(s.prefill_s) == 1 and s.prefill_s[0] > 0 and s.decode_s > 0 for s in samples)
        assert peak >= facts.rss_after_load_bytes > 0
        uploaded = {file: file.stat().st_mtime_ns for file in remote.rglob("*")}
        if attempt == 0:
            first_upload = uploaded
            assert (remote / UPLOADED).is_file() and len(uploaded) == len(list(tiny_onnx.rglob("*"))) + 1
        else:
            assert uploaded == first_upload, "the second run found the upload complete and sent nothing"
    assert content_sha256(remote) == content_sha256(tiny_onnx)

    requests = sshd.requests()
    assert [r["op"] for r in requests[:3]] == ["environment", "setup", "bandwidth"], "all asked over SSH"
    loads = [r for r in requests if r["op"] == "load"]
    assert [r["path"] for r in loads] == [str(remote)] * 2, "the worker loads the uploaded copy"


def test_interrupted_upload_is_redone(sshd, tmp_path, stories_int4):
    from edgeforge.fileio import content_sha256

    device = load_farm(_farm(tmp_path, sshd.device_table("board"))).devices[0]
    runner = runner_for(device)
    client = runner.connect()
    try:
        remote = Path(runner.upload(client, stories_int4))
        (remote / UPLOADED).unlink()
        next(remote.glob("*.safetensors")).write_bytes(b"half")
        assert Path(runner.upload(client, stories_int4)) == remote
    finally:
        client.close()
    assert (remote / UPLOADED).is_file() and content_sha256(remote) == content_sha256(stories_int4)


def test_wrong_or_unknown_host_key_is_refused_in_one_line(sshd, tmp_path):
    other_key = _keygen(tmp_path / "other").split()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other_key[0]} {other_key[1]}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    farm = load_farm(_farm(tmp_path, sshd.device_table("wrong", known_hosts=str(wrong)) +
                           sshd.device_table("unknown", known_hosts=str(empty))))
    for device, problem in zip(farm.devices, ("its host key (ssh-ed25519) is not the one the known_hosts file "
                                              "holds for it", "the host is not in the known_hosts file")):
        with pytest.raises(RuntimeFailure) as refused:
            runner_for(device).environment(threads=None)
        assert str(refused.value) == f"{device.connection.known_hosts}: device {device.name!r} " \
                                     f"({sshd.user}@127.0.0.1:{sshd.port}): refused: {problem}"


# ---- edgeforge devices ----

def test_devices_table_reports_ssh_local_unreachable_and_broken(sshd, tmp_path):
    farm = _farm(tmp_path, sshd.device_table("board", labels={"os": "linux"}) +
                 '[[device]]\nname = "here"\nkind = "local"\n\n' +
                 sshd.device_table("gone", port=_free_port()) +
                 sshd.device_table("broken", python="/nonexistent/python"))
    out = tmp_path / "devices.json"
    result = CliRunner().invoke(main, ["devices", "--farm", str(farm), "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    header, board, here, gone, broken = result.stdout.splitlines()
    assert header.split()[:4] == ["device", "kind", "labels", "status"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert board.split()[:5] == ["board", "ssh", "os=linux", "ok", python] and "onnx ok" in board, board
    assert here.split()[:4] == ["here", "local", "-", "ok"] and "pte ok" in here, here
    assert gone.split()[:5] == ["gone", "ssh", "-", "NOT", "READY:"] and "unreachable: Connection refused" in gone
    assert broken.split()[:5] == ["broken", "ssh", "-", "NOT", "READY:"] and \
        "died during probe (exit 127): " in broken and "/nonexistent/python: No such file or directory" in broken, broken
    data = json.loads(out.read_text())
    assert data["kind"] == "edgeforge.devices" and [d["device"]["name"] for d in data["devices"]] == \
        ["board", "here", "gone", "broken"]
    board_status = data["devices"][0]
    assert board_status["reachable"] and board_status["cpus"] == len(os.sched_getaffinity(0))
    assert board_status["runtimes"] == {"onnx": None, "pte": None}
    assert board_status["versions"]["onnxruntime"] and board_status["edgeforge"]

    strict = CliRunner().invoke(main, ["devices", "--farm", str(farm), "--devices", "gone", "--strict"])
    assert strict.exit_code == 3, strict.output + strict.stderr
    assert strict.stderr == f"edgeforge: error: {farm}: not reachable or not checked: gone\n"
