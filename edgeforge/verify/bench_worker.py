"""The process that holds one model while ``edgeforge.verify.bench`` measures it, and the parent's
handle on it (:class:`WorkerProcess`).

    python -m edgeforge.verify.bench_worker [--bandwidth-only]    (started by bench; not a user command)

Requests arrive as JSON lines on stdin and each gets one JSON line back on the original stdout
(anything a library prints is sent to stderr so it cannot corrupt the exchange). One model per
process, so the process's peak RSS (VmHWM) is that model's: interpreter + torch + its runtime +
weights + KV cache + activations; the RSS after the imports is reported beside it. (Not ru_maxrss:
Linux carries the parent's high-water mark into it across fork + exec.)

What is timed (tokenizer and sampling beyond argmax excluded; prompts arrive as token ids):
- load: ``Artifact.open()`` or the eager load + ``setup_cache``; runtime imports are timed apart.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeforge import errors
from edgeforge.errors import RuntimeFailure


def _executorch(threads: int) -> str:
    """Import the ExecuTorch runtime and the kernels our programs use (seconds: kept out of load time), and
    size its threadpool (it ignores torch's setting)."""
    import executorch.runtime  # noqa: F401
    from executorch.extension.pybindings import portable_lib

    from edgeforge.export.executorch import register_kernels

    register_kernels()

    portable_lib._unsafe_reset_threadpool(threads)
    return f", ExecuTorch threadpool reset to {portable_lib._threadpool_get_thread_count()}"


def _onnxruntime(threads: int) -> str:
    """Import onnxruntime; its session's intra-op pool is sized by the exporter's open(), not here."""
    import onnxruntime  # noqa: F401

    return ", onnxruntime's default intra-op pool (not set by bench; bounded by the affinity)"


RUNTIMES = {"pte": _executorch, "onnx": _onnxruntime}  # artifact format -> import + threads; the rest run eager


class EagerSession:
    """An eager model (fp32 or edgeforge-quantized) behind the artifact Session interface."""

    def __init__(self, model):
        self.model = model

    def forward(self, tokens, input_pos):
        import torch

        with torch.inference_mode():
            return self.model(tokens, input_pos)


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

    def op_bandwidth(self, *, threads: int, repetitions: int, size_bytes: int | None, probe_bytes: list[int]) -> dict:
        from edgeforge.verify.machine import measure_bandwidth

        return measure_bandwidth(threads=threads, repetitions=repetitions, size_bytes=size_bytes,
                                 probe_bytes=tuple(probe_bytes)).to_dict()

    def op_load(self, *, path: str, format: str, max_seq_len: int, threads: int) -> dict:
        start = time.perf_counter()
        runtime = RUNTIMES.get(format)
        if runtime is not None:
            from edgeforge.export import open_artifact
            from edgeforge.export.artifact import exporter_for

            exporter_for(format)  # imports the exporter module, and with it what its session needs
            self.threads_note += runtime(threads)
        else:
            import edgeforge.quantize  # noqa: F401  (registers the quantized-checkpoint format)
            from edgeforge.checkpoints import load_model, open_checkpoint
            from edgeforge.quantize import load_quantized_model
        import_s = self.startup_import_s + time.perf_counter() - start
        rss_after_import = _status_bytes("VmRSS")
        start = time.perf_counter()
        if runtime is not None:
            self.session = open_artifact(path).open()
        else:
            model = load_quantized_model(path) if format == "edgeforge" else load_model(open_checkpoint(path))
            model.setup_cache(1, max_seq_len)
            self.session = EagerSession(model)
        load_s = time.perf_counter() - start
        return {"import_s": import_s, "load_s": load_s, "rss_after_import_bytes": rss_after_import,
                "rss_after_load_bytes": _status_bytes("VmRSS"), "threads_note": self.threads_note}

    def op_run(self, *, prompts: list[list[int]], decode_context: list[int], decode_tokens: int) -> dict:
        """One repetition: every prefill test, then the decode test."""
        prefill_s = [self._prefill(ids)[0] for ids in prompts]
        return {"prefill_s": prefill_s, "decode_s": self._decode(decode_context, decode_tokens)}

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


# ---- the parent's side ----

class WorkerProcess:
    """A bench_worker subprocess; ``call`` sends one request and returns its reply or raises its error."""

    def __init__(self, name: str, *, bandwidth_only: bool = False):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "edgeforge.verify.bench_worker"] + ["--bandwidth-only"] * bandwidth_only
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
