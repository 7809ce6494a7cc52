"""The process that holds one model while the ``local`` runner (:mod:`edgeforge.runners.local`) measures it
(or the ``ssh`` runner, which starts it on the remote machine over an SSH channel).

    python -m edgeforge.runners.local_worker [--bandwidth-only]    (started by the runner; not a user command)

Requests arrive as JSON lines on stdin and each gets one JSON line back on the original stdout
(anything a library prints is sent to stderr so it cannot corrupt the exchange). One model per
process, so the process's peak RSS (VmHWM) is that model's: interpreter + torch + its runtime +
weights + KV cache + activations; the RSS after the imports is reported beside it. (Not ru_maxrss:
Linux carries the parent's high-water mark into it across fork + exec.)

What is timed (tokenizer and sampling beyond argmax excluded; prompts arrive as token ids):
- load: ``edgeforge.verify.models.open_session`` (``Artifact.open()``, or the eager load + KV-cache
  setup); runtime imports (``prepare_runtime``: an artifact's from its exporter) are timed apart.
- prefill / TTFT: one ``forward(prompt [1, P], positions 0..P-1)`` from an empty cache plus the
  argmax of the last position's logits (the first token).
- decode: after an untimed prefill of the context, N single-token ``forward`` calls, each fed the
  argmax of the previous logits; the N calls together are one sample.
Python's garbage collector is paused inside timed regions.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from edgeforge.errors import RuntimeFailure


class Worker:
    def __init__(self, startup_import_s: float):
        self.session = None
        self.threads_note = None
        self.startup_import_s = startup_import_s

    def op_setup(self, *, threads: int, cores: list[int]) -> dict:
        os.sched_setaffinity(0, cores)
        import torch

        torch.set_num_threads(threads)
        self.threads_note = f"torch.set_num_threads({threads}), CPU affinity {cores}"
        return {}

    def op_environment(self, *, threads: int | None, cpu_mask: list[int] | None) -> dict:
        """This machine's facts (for a runner that started this worker on another machine: ssh)."""
        from dataclasses import asdict

        from edgeforge.runners.local import machine_environment

        return asdict(machine_environment(threads=threads, cpu_mask=cpu_mask))

    def op_probe(self) -> dict:
        """What this machine runs (``edgeforge devices``): versions, CPUs, and each artifact format's runtime
        imported for real (None, or the first line of why it fails)."""
        import platform

        from edgeforge import __version__
        from edgeforge.export.artifact import EXPORTERS
        from edgeforge.provenance import package_versions
        from edgeforge.verify.machine import VERSIONED_PACKAGES

        runtimes = {}
        for format in EXPORTERS.names():
            try:
                EXPORTERS.get(format).prepare_runtime(1)
                runtimes[format] = None
            except Exception as exc:  # reported per format: the device runs the others
                runtimes[format] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        return {"python": platform.python_version(), "edgeforge": __version__, "cpus": len(os.sched_getaffinity(0)),
                "versions": package_versions(*VERSIONED_PACKAGES), "runtimes": runtimes}

    def op_conditions(self) -> dict:
        """The device's state now (edgeforge.runners.conditions.Conditions), read around each sample."""
        from edgeforge.records import encode
        from edgeforge.runners.conditions import read_conditions

        return encode(read_conditions())

    def op_identity(self) -> dict:
        """The hash of the edgeforge code this worker runs, uname and OS build (a job's Provenance)."""
        from edgeforge.runners.conditions import read_identity

        return read_identity()

    def op_bandwidth(self, *, threads: int, repetitions: int, size_bytes: int | None, probe_bytes: list[int]) -> dict:
        from edgeforge.verify.machine import measure_bandwidth

        return measure_bandwidth(threads=threads, repetitions=repetitions, size_bytes=size_bytes,
                                 probe_bytes=tuple(probe_bytes)).to_dict()

    def op_load(self, *, path: str, format: str, max_seq_len: int, threads: int) -> dict:
        start = time.perf_counter()
        from edgeforge.verify.models import describe_model, open_session, prepare_runtime

        self.threads_note += prepare_runtime(format, threads=threads)
        import_s = self.startup_import_s + time.perf_counter() - start
        rss_after_import = _status_bytes("VmRSS")
        start = time.perf_counter()
        self.session = open_session(describe_model(path), max_seq_len=max_seq_len)
        load_s = time.perf_counter() - start
        return {"import_s": import_s, "load_s": load_s, "rss_after_import_bytes": rss_after_import,
                "rss_after_load_bytes": _status_bytes("VmRSS"), "threads_note": self.threads_note}

    def op_run(self, *, prompts: list[list[int]], decode_context: list[int], decode_tokens: int) -> dict:
        """One repetition: every prefill test, then the decode test."""
        prefill_s = [self._prefill(ids)[0] for ids in prompts]
        return {"prefill_s": prefill_s, "decode_s": self._decode(decode_context, decode_tokens)}

    def op_drift_window(self, *, tokens: list[int], topk_ids: dict, with_logits: bool) -> dict:
        """verify on this device: one window through the loaded artifact, answered with what the statistics read
        (:func:`edgeforge.verify.remote.device_window`)."""
        from edgeforge.verify.remote import device_window

        return device_window(self.session, tokens, topk_ids, with_logits)

    def op_finish(self) -> dict:
        # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across fork + exec
        return {"peak_rss_bytes": _status_bytes("VmHWM")}

    def _prefill(self, ids: list[int]) -> tuple[float, int]:
        import torch

        tokens, positions = torch.tensor([ids], dtype=torch.long), torch.arange(len(ids))
        gc.disable()
        try:
            start = time.perf_counter()
            logits = self.session.forward(tokens, positions)
            first = int(logits[0, -1].argmax())
            return time.perf_counter() - start, first
        finally:
            gc.enable()

    def _decode(self, context: list[int], count: int) -> float:
        import torch

        _, token = self._prefill(context)
        positions = [torch.tensor([len(context) + i]) for i in range(count)]
        gc.disable()
        try:
            start = time.perf_counter()
            for position in positions:
                logits = self.session.forward(torch.tensor([[token]], dtype=torch.long), position)
                token = int(logits[0, -1].argmax())
            return time.perf_counter() - start
        finally:
            gc.enable()


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak of this image)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeFailure(f"/proc/self/status has no {field}: peak RSS cannot be measured on this system")


# ---- the worker's side ----

def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the replies
    sys.stdout = sys.stderr
    start = time.perf_counter()
    import torch  # noqa: F401  (before the first request, so sibling workers import side by side)

    if "--bandwidth-only" not in sys.argv:
        import torch._dynamo  # noqa: F401  (torch imports it lazily on the first module built: not load time)

    worker = Worker(time.perf_counter() - start)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(worker, f"op_{op}")(**request)
        except Exception as exc:  # handed to the parent, which raises it as a typed error
            from edgeforge.errors import EdgeforgeError

            typed = isinstance(exc, EdgeforgeError)
            message = exc.problem if typed else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            reply = {"error": {"type": type(exc).__name__ if typed else None, "message": message,
                               "path": str(exc.path) if typed and exc.path else None}}
        replies.write(json.dumps(reply) + "\n")
        if op == "finish":
            break


if __name__ == "__main__":
    main()
