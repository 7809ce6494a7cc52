"""The ``local`` runner: each model in its own fresh process on this machine
(:mod:`edgeforge.runners.local_worker`, which documents what is timed), pinned with ``sched_setaffinity`` to
the CPUs this process may use (within the device's ``cpu_mask``), so a model's peak RSS is its own; the memory
bandwidth is measured in a process of its own before any model loads.

The worker protocol (JSON lines; :class:`WorkerChannel`) and a model held by a worker (:class:`WorkerModel`) are
shared with the runners that start the same worker elsewhere (``ssh``: over an SSH channel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgeforge import errors
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.runners import Environment, LoadFacts, Samples, Workload

WORKER_MODULE = "edgeforge.runners.local_worker"


class LocalRunner:
    name = "local"
    Connection = None  # this machine: nothing to connect to

    def __init__(self, device):
        self.device = device

    def environment(self, *, threads: int | None) -> Environment:
        return machine_environment(threads=threads or self.device.threads, cpu_mask=self.device.cpu_mask)

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        with WorkerProcess("the bandwidth test", bandwidth_only=True) as meter:
            return measure_bandwidth_in(meter.channel, environment, repetitions=repetitions, size_bytes=size_bytes,
                                        probe_bytes=probe_bytes)

    def prepare(self, model, environment: Environment) -> WorkerModel:
        return WorkerModel(WorkerProcess(model.label), model, environment, path=model.path)

    def probe(self) -> dict:
        """What this machine runs (``local_worker``'s probe, in a fresh process as a model would run)."""
        with WorkerProcess("the device check", bandwidth_only=True) as worker:
            return worker.channel.call("probe")


def machine_environment(*, threads: int | None, cpu_mask: tuple[int, ...] | None) -> Environment:
    """This machine's facts: the CPUs this process may use (those of ``cpu_mask`` only), ``threads`` of them
    (None: all)."""
    from edgeforge.verify.machine import describe_machine

    allowed = sorted(os.sched_getaffinity(0))
    cores = [cpu for cpu in allowed if cpu_mask is None or cpu in cpu_mask]
    if not cores:
        raise ConfigError(f"cpu_mask {list(cpu_mask)} names none of the CPUs this machine lets us use: {allowed}")
    threads = threads or len(cores)
    return Environment(threads=threads, cores=cores[:threads], machine=describe_machine(threads=threads).to_dict())


def measure_bandwidth_in(channel: WorkerChannel, environment: Environment, *, repetitions: int,
                         size_bytes: int | None, probe_bytes: tuple[int, ...]):
    """The bandwidth test in a worker started with ``--bandwidth-only``, pinned as ``environment`` says."""
    from edgeforge.verify.machine import Bandwidth

    channel.call("setup", threads=environment.threads, cores=environment.cores)
    return Bandwidth.from_dict(channel.call("bandwidth", threads=environment.threads, repetitions=repetitions,
                                            size_bytes=size_bytes, probe_bytes=list(probe_bytes)))


class WorkerModel:
    """One model in its own worker (started and pinned here; loaded by ``load`` from ``path``, the model's path
    where the worker runs). ``worker``: anything with ``channel`` (a :class:`WorkerChannel`) and ``close()``."""

    def __init__(self, worker, model, environment: Environment, *, path: str | Path):
        self.worker, self.model, self.environment, self.path = worker, model, environment, str(path)
        try:
            self.worker.channel.call("setup", threads=environment.threads, cores=environment.cores)
        except BaseException:
            self.worker.close()
            raise

    def load(self) -> LoadFacts:
        return LoadFacts(**self.worker.channel.call("load", path=self.path, format=self.model.format,
                                                    max_seq_len=self.model.max_seq_len,
                                                    threads=self.environment.threads))

    def run(self, workload: Workload) -> Samples:
        return Samples(**self.worker.channel.call("run", prompts=workload.prompts,
                                                  decode_context=workload.decode_context,
                                                  decode_tokens=workload.decode_tokens))

    def finish(self) -> int:
        return self.worker.channel.call("finish")["peak_rss_bytes"]

    def __enter__(self) -> WorkerModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.worker.close()


class WorkerChannel:
    """A local_worker's requests and replies, one JSON line each, over two text streams (a pipe, an SSH channel);
    ``call`` sends one request and returns its reply or raises its error as edgeforge's typed error.

    ``ended()`` says, once the replies have stopped, how the worker ended: (exit status, its last stderr line).
    """

    def __init__(self, name: str, requests, replies, *, ended: Callable[[], tuple[int | None, str]]):
        self.name, self.requests, self.replies, self.ended = name, requests, replies, ended

    def call(self, op: str, **arguments) -> dict:
        try:
            self.requests.write(json.dumps({"op": op, **arguments}) + "\n")
            self.requests.flush()
            line = self.replies.readline()
        except OSError:  # BrokenPipeError from a pipe, OSError("Socket is closed") from an SSH channel
            line = ""
        if not line:
            status, last_line = self.ended()
            raise RuntimeFailure(f"the bench process for {self.name} died during {op} (exit {status}): {last_line}")
        reply = json.loads(line)
        if "error" in reply:
            error = reply["error"]
            kind = getattr(errors, error["type"] or "", None)
            kind = kind if isinstance(kind, type) and issubclass(kind, errors.EdgeforgeError) and \
                kind is not errors.UnknownNameError else RuntimeFailure
            raise kind(f"{error['message']} (in the bench process for {self.name}, during {op})", path=error["path"])
        return reply


def last_line(text: str) -> str:
    """The last non-blank line of a worker's stderr ("no output" if none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class WorkerProcess:
    """A local_worker subprocess on this machine, spoken to through ``channel``."""

    def __init__(self, name: str, *, bandwidth_only: bool = False):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", WORKER_MODULE] + ["--bandwidth-only"] * bandwidth_only
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, bufsize=1)
        self.channel = WorkerChannel(name, self.process.stdin, self.process.stdout, ended=self._ended)

    def _ended(self) -> tuple[int | None, str]:
        self.process.wait()
        self.stderr.seek(0)
        return self.process.returncode, last_line(self.stderr.read())

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the process: stdin closed ends its loop; killed if it does not exit within 10 s."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        if not self.stderr.closed:
            self.stderr.close()
