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
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeforge import errors
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.runners import Environment, LoadFacts, Samples, Workload

WORKER_MODULE = "edgeforge.runners.local_worker"
CALL_FLOOR_S = 120.0  # the least time any worker call gets before the worker counts as hung
RUN_S_PER_TOKEN = 1.0  # a workload's first run: this per token it processes, above the floor
RUN_MULTIPLE = 10  # later runs: this many times the slowest earlier run, above the floor
# long ops (a large model from slow storage; probe imports every runtime); others: the floor
OP_TIMEOUTS_S = {"load": 1800.0, "bandwidth": 600.0, "probe": 600.0}


class LocalRunner:
    name = "local"
    Connection = None  # this machine: nothing to connect to

    def __init__(self, device):
        self.device = device

    def environment(self, *, threads: int | None) -> Environment:
        return machine_environment(threads=threads or self.device.threads, cpu_mask=self.device.cpu_mask)

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        with WorkerProcess(self._name("the bandwidth test"), bandwidth_only=True,
                           timeout_s=self.device.timeout_s) as meter:
            return measure_bandwidth_in(meter.channel, environment, repetitions=repetitions, size_bytes=size_bytes,
                                        probe_bytes=probe_bytes)

    def prepare(self, model, environment: Environment) -> WorkerModel:
        return WorkerModel(WorkerProcess(self._name(model.label), timeout_s=self.device.timeout_s), model,
                           environment, path=model.path)

    def probe(self) -> dict:
        """What this machine runs (``local_worker``'s probe, in a fresh process as a model would run)."""
        with WorkerProcess(self._name("the device check"), bandwidth_only=True,
                           timeout_s=self.device.timeout_s) as worker:
            return worker.channel.call("probe")

    def _name(self, what: str) -> str:
        return f"{what} on {self.device.name}"


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
    where the worker runs). ``worker``: anything with ``channel`` (a :class:`WorkerChannel`), ``command`` (the
    worker's command line on the device) and ``close()``."""

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

    def conditions(self) -> dict:
        """The device's state now (``edgeforge.runners.conditions.Conditions``' fields), read by the worker."""
        return self.worker.channel.call("conditions")

    def identity(self) -> dict:
        """The worker's part of a ``Provenance``: runner hash, uname, OS build, and its command line."""
        return {**self.worker.channel.call("identity"), "command": list(self.worker.command)}

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
    Every call has a deadline (``timeout_s`` for every op, else :meth:`deadline_s`'s); past it ``stop()`` kills the
    worker or closes its channel, which ends the blocked read, and the call raises RuntimeFailure.
    """

    def __init__(self, name: str, requests, replies, *, ended: Callable[[], tuple[int | None, str]],
                 stop: Callable[[], None], timeout_s: float | None = None):
        self.name, self.requests, self.replies, self.ended, self.stop = name, requests, replies, ended, stop
        self.timeout_s = timeout_s
        self.slowest_run_s: float | None = None

    def deadline_s(self, op: str, arguments: dict) -> float:
        """Seconds ``op`` may take: a run, the floor plus RUN_S_PER_TOKEN per token of the workload, or once a run has
        finished RUN_MULTIPLE times the slowest so far; load and bandwidth, OP_TIMEOUTS_S; anything else the floor."""
        if self.timeout_s is not None:
            return self.timeout_s
        if op != "run":
            return OP_TIMEOUTS_S.get(op, CALL_FLOOR_S)
        if self.slowest_run_s is not None:
            return CALL_FLOOR_S + RUN_MULTIPLE * self.slowest_run_s
        tokens = sum(map(len, arguments["prompts"])) + len(arguments["decode_context"]) + arguments["decode_tokens"]
        return CALL_FLOOR_S + RUN_S_PER_TOKEN * tokens

    def call(self, op: str, **arguments) -> dict:
        limit = self.deadline_s(op, arguments)
        expired = threading.Event()
        timer = threading.Timer(limit, lambda: (expired.set(), self.stop()))
        timer.daemon = True
        start = time.monotonic()
        timer.start()
        try:
            self.requests.write(json.dumps({"op": op, **arguments}) + "\n")
            self.requests.flush()
            line = self.replies.readline()
        except (OSError, ValueError):  # BrokenPipeError, OSError("Socket is closed"); ValueError: a file we closed
            line = ""
        finally:
            timer.cancel()
        waited = time.monotonic() - start
        if expired.is_set():
            raise RuntimeFailure(f"the bench process for {self.name} did not answer {op} within {limit:g} s "
                                 f"(waited {waited:.1f} s): stopped it (the device entry's timeout_s sets the limit)")
        if op == "run":
            self.slowest_run_s = max(waited, self.slowest_run_s or 0.0)
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

    def __init__(self, name: str, *, bandwidth_only: bool = False, timeout_s: float | None = None):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.command = [sys.executable, "-m", WORKER_MODULE] + ["--bandwidth-only"] * bandwidth_only
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1)
        self.channel = WorkerChannel(name, self.process.stdin, self.process.stdout, ended=self._ended,
                                     stop=self.process.kill, timeout_s=timeout_s)

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
