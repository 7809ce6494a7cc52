"""The ``adb`` runner: an Android phone, measured with an ExecuTorch LLM runner binary (``llama_main``, built for
arm64) that the farm entry names. A farm entry::

    [[device]]
    name = "pixel8"
    kind = "adb"
    labels = { os = "android", soc = "tensor-g3" }
    cpu_mask = [4, 5, 6, 7]          # taskset's mask; threads default to its size
    serial = "38121FDJH00CLK"        # `adb devices`
    runner = "bin/llama_main"        # a local path (relative to the farm file)
    workdir = "/data/local/tmp/edgeforge"   # optional; adb_host / adb_port: optional adb server (127.0.0.1:5037)

``prepare`` pushes the ``.pte`` artifact's files (model, tokenizer, manifest) and the runner binary to
``workdir/<content sha256>/`` unless they are already there complete (a marker file is written last). The binary's
``--help`` is read once per runner and the command is built from the flags that release has
(:func:`edgeforge.runners.adb_observer.runner_command`). Each prompt of a round is one run of the binary through
``adb shell``, pinned with ``taskset`` to the environment's cores, ``--cpu_threads`` from its threads, greedy;
its ``PyTorchObserver`` line gives the timings (:mod:`edgeforge.runners.adb_observer` says what each means).

Prompts: bench's workload is token ids; the runner takes text. The ids are decoded with the artifact's tokenizer
(fitted until the local tokenizer encodes the text back to exactly as many tokens), and the phone's tokenizer
encodes it again; the observer's ``prompt_tokens`` is what the phone prefilled, and a run whose count is not the
workload's (or one more: a BOS the release prepends) is refused. A decode of more or fewer forwards than asked
(v0.4 has no ``--ignore_eos`` and a BOS may or may not be prepended) is scaled to the same tokens/s.

What is not measured: the runner binary has no bandwidth test (``measure_bandwidth`` returns None: no ceiling),
no import stage (import_s 0, RSS after import 0), and its peak RSS is the largest ``RSS after ...`` it logs
(0 where its log goes to logcat instead of stderr).

Library: adbutils. It is maintained and speaks the adb server's protocol directly (push, shell with exit code and
stderr apart, getprop), so nothing parses the ``adb`` CLI's text. It is never allowed to start a server from the
adb binary it bundles: a server is started only from the ``adb`` on PATH (platform-tools; a second version would
kill the user's server), and without either a server or that binary the device is reported in one line.
"""

from __future__ import annotations

import posixpath
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeforge import __version__
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.fileio import content_files, content_sha256
from edgeforge.runners import Environment, LoadFacts, Samples, Workload
from edgeforge.runners.adb_observer import (CONDITIONS_SCRIPT, FACTS_SCRIPT, last_line, load_facts, parse_conditions,
                                            parse_facts, parse_observer, peak_rss_bytes, run_samples, runner_command,
                                            runner_flags)

DEFAULT_WORKDIR = "/data/local/tmp/edgeforge"
PUSHED = ".edgeforge-pushed"  # written last into a pushed folder: the push is complete
SERVER_TIMEOUT_S = 3
SHELL_TIMEOUT_S = 600
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOAD_PROMPT = "Once upon a time"  # the untimed run that load() takes the model's load time from
PROMPT_FILLER = " the"  # appended to a decoded prompt that encodes to too few tokens


@dataclass(frozen=True)
class AdbConnection:
    """How to reach an adb device (its farm table's keys): serial (``adb devices``), runner (the local ExecuTorch
    LLM runner binary), workdir (the phone's folder files are pushed into), the adb server's host and port."""

    serial: str
    runner: Path = field(metadata={"path": True})
    workdir: str = DEFAULT_WORKDIR
    adb_host: str = "127.0.0.1"
    adb_port: int = 5037

    def __post_init__(self):
        from edgeforge.runners.farm import check_connection

        check_connection(self, strings=("serial", "adb_host"), folders=("workdir",), ports=("adb_port",))

    @property
    def server(self) -> str:
        return f"{self.adb_host}:{self.adb_port}"


class AdbRunner:
    name = "adb"
    Connection = AdbConnection

    def __init__(self, device):
        if not isinstance(device.connection, AdbConnection):
            raise ConfigError(f"the adb runner needs a device from a farm file (its serial and runner binary); "
                              f"{device.name!r} has none: pass --farm")
        self.device, self.connection = device, device.connection
        self.where = f"device {device.name!r} (adb serial {self.connection.serial})"
        self._flags: dict[str, str] | None = None

    def environment(self, *, threads: int | None) -> Environment:
        """The phone's facts (:func:`machine_facts`) and cores: its ``cpu_mask`` (default every CPU), the first
        ``threads`` of them."""
        facts = self.facts()
        cores = list(self.device.cpu_mask or range(facts["cpus"]))
        if any(core >= facts["cpus"] for core in cores):
            raise ConfigError(f"{self.where}: cpu_mask {cores} names CPUs the phone lacks (it has {facts['cpus']})")
        threads = threads or self.device.threads or len(cores)
        return Environment(threads=threads, cores=cores[:threads],
                           machine=machine_facts(facts, threads=threads, usable_cpus=len(cores)))

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        """None: the runner binary has no bandwidth test, so no ceiling is set."""
        return None

    def prepare(self, model, environment: Environment) -> AdbModel:
        if model.format != "pte":
            raise ConfigError(f"the adb runner runs only .pte artifacts (with ExecuTorch's LLM runner); this "
                              f"model's format is {model.format!r}", path=model.path)
        phone = self.connect()
        folder = self.push(phone, Path(model.path))
        return AdbModel(self, phone, model, environment, folder)

    def probe(self) -> dict:
        """For ``edgeforge devices``: the phone reached through the adb server, its Android build and CPUs; the
        runner binary present locally."""
        self.runner_binary()
        facts = self.facts()
        props = facts["props"]
        android = f"Android {props.get('ro.build.version.release', '?')} ({props.get('ro.build.fingerprint', '?')})"
        return {"python": None, "edgeforge": None, "cpus": facts["cpus"],
                "versions": {"android": android, "rooted": str(facts["rooted"]).lower()},
                "runtimes": {"pte": None}}

    # ---- the phone ----

    def facts(self) -> dict:
        output = self.shell(self.connect(), FACTS_SCRIPT, timeout=60).stdout
        return parse_facts(output)

    def connect(self):
        """The phone as an ``adbutils.AdbDevice``; one line when no server answers and none can be started, or the
        serial is not attached."""
        import adbutils

        connection = self.connection
        if not _server_answers(connection.adb_host, connection.adb_port):
            self._start_server()
        client = adbutils.AdbClient(host=connection.adb_host, port=connection.adb_port,
                                    socket_timeout=SERVER_TIMEOUT_S)
        try:
            attached = client.list()
        except (adbutils.AdbError, OSError) as exc:
            raise RuntimeFailure(f"{self.where}: the adb server at {connection.server} failed: {exc}") from None
        states = {info.serial: info.state for info in attached}
        if states.get(connection.serial) != "device":
            seen = ", ".join(f"{serial} ({state})" for serial, state in states.items()) or "no devices"
            state = f"is {states[connection.serial]}" if connection.serial in states else "is not attached"
            raise RuntimeFailure(f"{self.where}: {state} to the adb server at {connection.server}; it sees {seen}")
        return client.device(serial=connection.serial)

    def _start_server(self) -> None:
        connection = self.connection
        adb = shutil.which("adb")
        if connection.adb_host not in LOCAL_HOSTS:
            raise RuntimeFailure(f"{self.where}: no adb server answers at {connection.server}")
        if adb is None:
            raise RuntimeFailure(f"{self.where}: adb: not found on PATH and no adb server answers at "
                                 f"{connection.server}; install Android platform-tools")
        started = subprocess.run([adb, "-P", str(connection.adb_port), "start-server"], capture_output=True,
                                 text=True, timeout=30)
        if started.returncode != 0 or not _server_answers(connection.adb_host, connection.adb_port):
            raise RuntimeFailure(f"{self.where}: `{adb} start-server` failed: {last_line(started.stderr)}")

    def shell(self, phone, command: str, *, timeout: float | None = None):
        """``command`` run by the phone's shell: an ``adbutils.ShellReturn`` (exit code, stdout, stderr); one silent
        for longer than ``timeout`` seconds (default: the device's ``timeout_s``, else SHELL_TIMEOUT_S) fails."""
        import adbutils

        try:
            return phone.shell2(command, timeout=timeout or self.device.timeout_s or SHELL_TIMEOUT_S, v2=True)
        except (adbutils.AdbError, OSError) as exc:
            raise RuntimeFailure(f"{self.where}: adb shell failed: {exc}") from None

    def runner_binary(self) -> Path:
        runner = self.connection.runner
        if not runner.is_file():
            raise ConfigError(f"{self.where}: the runner binary {runner} does not exist (build ExecuTorch's "
                              "llama_main for arm64 and name it in the farm file)")
        return runner

    def push(self, phone, artifact: Path) -> str:
        """The artifact folder's files and the runner binary at ``workdir/<content sha256>/`` (pushed unless already
        complete there); that folder."""
        import adbutils

        runner = self.runner_binary()
        folder = artifact if artifact.is_dir() else artifact.parent
        remote = posixpath.join(self.connection.workdir, content_sha256(folder, runner))
        if self.shell(phone, f"test -f {shlex.quote(posixpath.join(remote, PUSHED))}").returncode == 0:
            return remote
        files = [(file, file.relative_to(folder).as_posix(), 0o644) for file in content_files(folder)]
        files.append((runner, runner.name, 0o755))
        folders = sorted({posixpath.dirname(posixpath.join(remote, name)) for _, name, _ in files})
        made = self.shell(phone, "mkdir -p " + " ".join(map(shlex.quote, folders)))
        if made.returncode != 0:
            raise RuntimeFailure(f"{self.where}: cannot make {remote}: {last_line(made.stderr or made.output)}")
        try:
            for file, name, mode in files:
                phone.sync.push(str(file), posixpath.join(remote, name), mode=mode)
        except (adbutils.AdbError, OSError) as exc:
            raise RuntimeFailure(f"{self.where}: push of {folder} to {remote} failed: {exc}") from None
        marker = shlex.quote(posixpath.join(remote, PUSHED))
        self.shell(phone, f"echo {len(files)} files from {shlex.quote(str(folder))} > {marker}")
        return remote

    def flags(self, phone, binary: str) -> dict[str, str]:
        """The runner binary's flags, from its ``--help`` (read once; gflags exits 1 after printing it)."""
        if self._flags is None:
            listed = self.shell(phone, f"{shlex.quote(binary)} --help", timeout=60)
            self._flags = runner_flags(listed.stdout or listed.output)
            if not self._flags:
                raise RuntimeFailure(f"{self.where}: {binary} --help listed no flags (exit {listed.returncode}): "
                                     f"{last_line(listed.stderr or listed.output)}")
        return self._flags


def machine_facts(facts: dict, *, threads: int, usable_cpus: int) -> dict:
    """``edgeforge.verify.machine.Machine``'s fields for the phone (cpufreq from its first policy; no LLC, no
    Python), its full facts under ``device_facts``."""
    from edgeforge.provenance import git_commit
    from edgeforge.verify.machine import utc_now

    props = facts["props"]
    first = next(iter(facts["cpufreq"].values()), {})
    soc = props.get("ro.soc.model") or facts["cpu_model"] or props.get("ro.hardware")
    return {"cpu_model": f"{soc} ({props.get('ro.product.manufacturer', '?')} {props.get('ro.product.model', '?')})",
            "logical_cpus": facts["cpus"], "usable_cpus": usable_cpus, "threads": threads,
            "governor": first.get("governor"), "cur_freq_khz": first.get("cur_khz"),
            "max_freq_khz": first.get("max_khz"), "llc_bytes": None,
            "memory_total_bytes": facts["memory_total_bytes"], "load_average_1m": facts["load_average_1m"],
            "os": f"Android {props.get('ro.build.version.release', '?')} ({props.get('ro.build.fingerprint', '?')})",
            "kernel": facts["kernel"], "python": "none (ExecuTorch runner binary)", "edgeforge": __version__,
            "git_commit": git_commit(), "versions": {}, "timestamp": utc_now(), "device_facts": facts}


class AdbModel:
    """One ``.pte`` artifact pushed to the phone; each run is a process of the runner binary there."""

    def __init__(self, runner: AdbRunner, phone, model, environment: Environment, folder: str):
        from edgeforge.checkpoints.tokenizers import find_tokenizer
        from edgeforge.verify.models import describe_model

        self.runner, self.phone, self.model, self.environment = runner, phone, model, environment
        record = describe_model(model.path).record
        if not record.report.runner_tokenizer:
            raise ConfigError("the artifact names no tokenizer for ExecuTorch's LLM runner", path=model.path)
        self.binary = posixpath.join(folder, runner.connection.runner.name)
        self.model_file = posixpath.join(folder, record.report.model_file)
        self.tokenizer_file = posixpath.join(folder, record.report.runner_tokenizer)
        local = Path(model.path) if Path(model.path).is_dir() else Path(model.path).parent
        self.tokenizer = find_tokenizer(local, vocab_size=model.config.vocab_size)
        self.flags = runner.flags(phone, self.binary)
        self.peak_rss, self.load_command = 0, []

    def load(self) -> LoadFacts:
        """One untimed run of the binary (a short prompt, no decode): its model load time and RSS after load."""
        prompt = self.tokenizer.encode(LOAD_PROMPT, add_special_tokens=False)
        observation, stderr, self.load_command = self._run_binary(prompt, decode_tokens=0)
        return load_facts(observation, stderr, threads_note=f"--cpu_threads={self.environment.threads} where the "
                          f"binary has it, taskset {self.load_command[1]} (cores {self.environment.cores})")

    def run(self, workload: Workload) -> Samples:
        """A run per prompt (prefill, and the decode after the one that is ``decode_context``)."""
        prefills, decode = [], None
        for prompt in workload.prompts:
            decoding = decode is None and prompt == workload.decode_context
            prefills.append(self._run_binary(prompt, decode_tokens=workload.decode_tokens if decoding else 0)[0])
            decode = prefills[-1] if decoding else decode
        if decode is None:
            decode = self._run_binary(workload.decode_context, decode_tokens=workload.decode_tokens)[0]
        return run_samples(prefills, decode, workload.decode_tokens)

    def conditions(self) -> dict:
        """The phone's thermal zones, governors, frequencies and load now (``Conditions``' fields)."""
        return parse_conditions(self.runner.shell(self.phone, CONDITIONS_SCRIPT, timeout=60).stdout,
                                time_s=time.time())

    def identity(self) -> dict:
        """What measured: the runner binary's sha256, the phone's uname and build, the load run's command."""
        uname = self.runner.shell(self.phone, "uname -s; uname -n; uname -r; uname -v; uname -m", timeout=60)
        keys = ("system", "node", "release", "version", "machine")
        return {"runner_sha256": content_sha256(self.runner.connection.runner),
                "runner_basis": f"the runner binary {self.runner.connection.runner.name} (name and bytes)",
                "uname": dict(zip(keys, uname.stdout.splitlines())),
                "os_build": self.runner.facts()["props"].get("ro.build.fingerprint"), "command": self.load_command}

    def finish(self) -> int:
        return self.peak_rss

    def __enter__(self) -> AdbModel:
        return self

    def __exit__(self, *exc_info) -> None:
        pass  # each run is its own process on the phone; the pushed files stay for the next session

    def _run_binary(self, prompt_ids: list[int], *, decode_tokens: int):
        text = fit_prompt(self.tokenizer, prompt_ids)
        command = runner_command(self.flags, binary=self.binary, model=self.model_file,
                                 tokenizer=self.tokenizer_file, prompt=text, prompt_tokens=len(prompt_ids),
                                 decode_tokens=decode_tokens, threads=self.environment.threads,
                                 cores=self.environment.cores)
        result = self.runner.shell(self.phone, shlex.join(command))
        stderr = result.stderr or result.output
        if result.returncode != 0:
            raise RuntimeFailure(f"{self.runner.where}: {self.binary} exited {result.returncode}: {last_line(stderr)}")
        observation = parse_observer(result.stdout or result.output, stderr=stderr, binary=self.binary)
        if not len(prompt_ids) <= observation.prompt_tokens <= len(prompt_ids) + 1:
            raise RuntimeFailure(f"{self.runner.where}: the phone's tokenizer made {observation.prompt_tokens} tokens "
                                 f"of a {len(prompt_ids)}-token prompt: its timings are not those of the workload")
        self.peak_rss = max(self.peak_rss, peak_rss_bytes(stderr))
        return observation, stderr, command


def fit_prompt(tokenizer, ids: list[int]) -> str:
    """A text the tokenizer encodes (without special tokens) to exactly ``len(ids)`` tokens: ``ids`` decoded (bytes
    that decode to no character dropped), then cut a character at a time or extended by a word until it does."""
    text = tokenizer.decode(ids).replace("\ufffd", "")
    for _ in range(8 * len(ids) + 16):
        count = len(tokenizer.encode(text, add_special_tokens=False))
        if count == len(ids):
            return text
        text = text[:-1] if count > len(ids) else text + PROMPT_FILLER
    raise RuntimeFailure(f"no text found that the tokenizer encodes to {len(ids)} tokens (from ids {ids[:8]}...)")


def _server_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=SERVER_TIMEOUT_S):
            return True
    except OSError:
        return False
