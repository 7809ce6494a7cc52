"""The ``local`` runner: each model in its own fresh process on this machine
(:mod:`edgeforge.runners.local_worker`, which documents what is timed), pinned with ``sched_setaffinity`` to
the CPUs this process may use, so a model's peak RSS is its own; the memory bandwidth is measured in a process
of its own before any model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from edgeforge import errors
from edgeforge.errors import RuntimeFailure
from edgeforge.runners import Environment, LoadFacts, Samples, Workload


class LocalRunner:
    name = "local"

    def environment(self, *, threads: int | None) -> Environment:
        from edgeforge.verify.machine import describe_machine

        cores = sorted(os.sched_getaffinity(0))
        threads = threads or len(cores)
        return Environment(threads=threads, cores=cores[:threads],
                           machine=describe_machine(threads=threads).to_dict())

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        from edgeforge.verify.machine import Bandwidth

        with WorkerProcess("the bandwidth test", bandwidth_only=True) as meter:
            meter.call("setup", threads=environment.threads, cores=environment.cores)
            return Bandwidth.from_dict(meter.call("bandwidth", threads=environment.threads, repetitions=repetitions,
                                                  size_bytes=size_bytes, probe_bytes=list(probe_bytes)))

    def prepare(self, model, environment: Environment) -> LocalModel:
        return LocalModel(model, environment)


class LocalModel:
    """One model in its own worker process (started and pinned here; loaded by ``load``)."""

    def __init__(self, model, environment: Environment):
        self.model, self.environment = model, environment
        self.process = WorkerProcess(model.label)
        try:
            self.process.call("setup", threads=environment.threads, cores=environment.cores)
        except BaseException:
            self.process.close()
            raise

    def load(self) -> LoadFacts:
        return LoadFacts(**self.process.call("load", path=str(self.model.path), format=self.model.format,
                                             max_seq_len=self.model.max_seq_len, threads=self.environment.threads))

    def run(self, workload: Workload) -> Samples:
        return Samples(**self.process.call("run", prompts=workload.prompts, decode_context=workload.decode_context,
                                           decode_tokens=workload.decode_tokens))

    def finish(self) -> int:
        return self.process.call("finish")["peak_rss_bytes"]

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.close()


class WorkerProcess:
    """A local_worker subprocess; ``call`` sends one request and returns its reply or raises its error."""

    def __init__(self, name: str, *, bandwidth_only: bool = False):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "edgeforge.runners.local_worker"] + ["--bandwidth-only"] * bandwidth_only
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, bufsize=1)

    def call(self, op: str, **arguments) -> dict:
        try:
            self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.process.wait()
            raise RuntimeFailure(f"the bench process for {self.name} died during {op} (exit "
                                 f"{self.process.returncode}): {self._stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            error = reply["error"]
            kind = getattr(errors, error["type"] or "", None)
            kind = kind if isinstance(kind, type) and issubclass(kind, errors.EdgeforgeError) and \
                kind is not errors.UnknownNameError else RuntimeFailure
            raise kind(f"{error['message']} (in the bench process for {self.name}, during {op})", path=error["path"])
        return reply

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

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
