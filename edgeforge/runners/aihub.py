"""The ``aihub`` runner: Qualcomm AI Hub's hosted phones, through its own client ``qai-hub``
(``pip install 'edgeforge[aihub]'``), for users with an AI Hub account.

    [[device]]
    name = "s24"
    kind = "aihub"
    device = "Samsung Galaxy S24 (Family)"   # the hub's device name (qai-hub list-devices)
    options = "--compute_unit cpu"           # optional: the profile job's options string

    profile = profile_on_hub(runner_for(device), "model.onnx.d")   # -> HubProfile (every inference time kept)

What the hub measures: a profile job (qai-hub 0.56: ``submit_inference_job(..., profile=True)``; its
``submit_profile_job`` is a deprecated alias) runs the ONNX graph in onnxruntime on the hosted phone, on inputs the
hub generates at the graph's input shapes, ``max_profiler_iterations`` times (default 100), and reports every
inference time (``all_inference_times``, µs), the first (cold) and warm load times and peak-memory ranges. It times
whole forward calls at one input shape: not a prefill of chosen prompt lengths from bench's workload, and not a
decode loop through the KV cache (each call is independent; no token is fed back). So :class:`HubProfile` keeps
exactly what the hub reports (every inference time, load times, memory ranges; null where the hub leaves a metric
missing), and the bench protocol's ``prepare`` refuses: bench's ``ppN``/``tgN`` samples cannot be filled honestly
from a profile job.

Credentials: the environment variable ``QAI_HUB_API_TOKEN``, else the client's own config file (``QAIHUB_CLIENT_INI``
or ``~/.qai_hub/client.ini``, written by ``qai-hub configure --api_token TOKEN``). The token is handed to the client
only; it is never logged, printed or written into a record. Only ONNX artifacts run here (a ``.pte``: ConfigError).
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from edgeforge.errors import ConfigError, InputError, RuntimeFailure, UnsupportedError
from edgeforge.records import Record, described

TOKEN_VARIABLE = "QAI_HUB_API_TOKEN"
CONFIG_VARIABLE = "QAIHUB_CLIENT_INI"  # the client's own: another config file than ~/.qai_hub/client.ini
INSTALL = "pip install 'edgeforge[aihub]'"
TIMED = ("AI Hub profile job: whole-model inferences in onnxruntime on the hosted device, on inputs the hub generates "
         "at the graph's input shapes; each call independent (no prompt lengths of ours, no KV-cache decode loop)")


@dataclass(frozen=True)
class AihubConnection:
    """device: the hub's device name (``qai-hub list-devices``); options: the profile job's options string."""

    device: str
    options: str = ""

    def __post_init__(self):
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device must be the hub's device name, e.g. \"Samsung Galaxy S24 (Family)\", "
                              f"got {self.device!r}")
        if not isinstance(self.options, str):
            raise ConfigError(f"options must be a string of profile-job options, got {self.options!r}")


@dataclass(frozen=True, kw_only=True)
class HubProfile(Record):
    """What one AI Hub profile job measured, as the hub reported it (times in seconds, memory in bytes)."""

    kind = "edgeforge.aihub-profile"
    version = 1

    device: str = described("the hub's device name the job ran on")
    job_id: str | None = described("the hub's job id (null for a profile read from a file)")
    artifact_sha256: str | None = described("content hash of the ONNX artifact profiled")
    inference_s: list[float] = described("every inference time the hub reported (all_inference_times), in order")
    estimated_inference_s: float | None = described("the hub's own summary figure (estimated_inference_time)")
    first_load_s: float | None = described("cold load (first_load_time), null when the hub left it missing")
    warm_load_s: float | None = described("warm load (warm_load_time), null when missing")
    compile_s: float | None = described("on-device compile (compile_time), null when missing")
    inference_peak_memory_bytes: list[int] | None = described("inference_memory_peak_range [low, high]; null: "
                                                              "missing")
    compute_units: dict[str, int] = described("layers per compute unit (CPU, GPU, NPU) from the per-layer detail")
    timed: str = described("what is timed, in words", default=TIMED)


def parse_profile(profile: dict, *, device: str, job_id: str | None = None,
                  artifact_sha256: str | None = None, path: str | Path | None = None) -> HubProfile:
    """A :class:`HubProfile` from ``InferenceJob.download_profile()``'s dict (qai-hub's ``execution_summary``, µs, and
    ``execution_detail``); InputError naming ``path`` when it is not one."""
    summary = profile.get("execution_summary") if isinstance(profile, dict) else None
    if not isinstance(summary, dict):
        raise InputError("not an AI Hub profile: no execution_summary", path=path)
    times = summary.get("all_inference_times")
    if not isinstance(times, list) or not times:
        raise InputError("the profile has no all_inference_times (profile detail older than 1.2?): only the summary "
                         "figure, which is not a set of samples", path=path)
    peak = summary.get("inference_memory_peak_range")
    units: dict[str, int] = {}
    for layer in profile.get("execution_detail") or []:
        units[layer["compute_unit"]] = units.get(layer["compute_unit"], 0) + 1
    return HubProfile(device=device, job_id=job_id, artifact_sha256=artifact_sha256,
                      inference_s=[microseconds / 1e6 for microseconds in times],
                      estimated_inference_s=_seconds(summary.get("estimated_inference_time")),
                      first_load_s=_seconds(summary.get("first_load_time")),
                      warm_load_s=_seconds(summary.get("warm_load_time")),
                      compile_s=_seconds(summary.get("compile_time")),
                      inference_peak_memory_bytes=list(peak) if peak else None, compute_units=units)


def _seconds(microseconds) -> float | None:
    return None if microseconds is None else microseconds / 1e6


class AihubRunner:
    name = "aihub"
    Connection = AihubConnection

    def __init__(self, device):
        if not isinstance(device.connection, AihubConnection):
            raise ConfigError(f"the aihub runner needs a device from a farm file (its hub device name); "
                              f"{device.name!r} has none: pass --farm")
        self.device, self.connection = device, device.connection

    def environment(self, *, threads: int | None):
        raise UnsupportedError(self._not_bench())

    def measure_bandwidth(self, environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        return None  # the hub runs no code of ours: nothing measures the phone's memory

    def prepare(self, model, environment):
        onnx_graph(model.path)
        raise UnsupportedError(self._not_bench())

    def probe(self) -> dict:
        """The client's version and the device found on the hub; one line when the token, the client or the device
        is missing."""
        client = self.client()
        from qai_hub import __version__

        found = self._call(client.get_devices, name=self.connection.device)
        if not found:
            raise RuntimeFailure(f"{self._where()}: the hub has no device named {self.connection.device!r} "
                                 "(qai-hub list-devices shows its names)")
        frameworks = sorted({attribute.split(":", 1)[1] for device in found for attribute in device.attributes
                             if attribute.startswith("framework:")})
        return {"versions": {"qai-hub": __version__, "hub os": found[0].os},
                "runtimes": {"onnx": None if "onnx" in frameworks else "the hub's device lists no onnx framework",
                             "pte": "not on AI Hub: the aihub runner profiles ONNX only"}}

    def client(self):
        """A ``qai_hub.Client`` with the token from the environment or the client's config; one line if either the
        token or the package is missing (the token's value is never shown)."""
        token = os.environ.get(TOKEN_VARIABLE)
        config_file = Path(os.environ.get(CONFIG_VARIABLE, "~/.qai_hub/client.ini")).expanduser()
        if not token and not _has_token(config_file):
            raise ConfigError(f"{self._where()}: no AI Hub API token: set {TOKEN_VARIABLE}, or run `qai-hub configure "
                              f"--api_token TOKEN` (it writes {config_file})")
        try:
            import qai_hub
        except ImportError:
            raise ConfigError(f"{self._where()}: the qai-hub client is not installed: {INSTALL}") from None
        if token:
            return qai_hub.Client(config=qai_hub.ClientConfig(api_token=token))
        return qai_hub.Client()

    def _call(self, function, *args, **kwargs):
        """A client call; the client's errors (network, auth, quota) as one RuntimeFailure line."""
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # the client raises its own, requests' and protobuf's exceptions
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeFailure(f"{self._where()}: AI Hub: {first}") from None

    def _where(self) -> str:
        return f"device {self.device.name!r} (AI Hub {self.connection.device!r})"

    def _not_bench(self) -> str:
        return (f"{self._where()}: bench's prefill/decode tests cannot run on AI Hub (a profile job times whole "
                "inferences on inputs the hub generates, with no KV-cache loop): use "
                "edgeforge.runners.aihub.profile_on_hub")


def onnx_graph(path: str | Path) -> list[Path]:
    """The files AI Hub takes of the ONNX artifact at ``path``: its one ``.onnx`` graph and its external data;
    ConfigError naming ``path`` for anything else (a ``.pte``, a checkpoint)."""
    path = Path(path)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    graphs = [file for file in files if file.suffix == ".onnx"]
    if len(graphs) != 1:
        found = ", ".join(sorted({file.suffix or file.name for file in files})) or "nothing"
        raise ConfigError(f"the aihub runner profiles ONNX artifacts only (a folder with one .onnx graph), this holds "
                          f"{found}: export with --format onnx", path=path)
    return graphs + [file for file in files if file.suffix == ".data"]


def profile_on_hub(runner: AihubRunner, artifact: str | Path, *, timeout_s: int | None = None) -> HubProfile:
    """Upload ``artifact``'s ONNX graph (and its external data) and profile it on the runner's hub device; waits
    for the job (at most ``timeout_s``; None: the client's default)."""
    import tempfile

    from edgeforge.fileio import content_sha256
    from edgeforge.verify.bench_models import describe_bench_model

    graph = onnx_graph(artifact)
    model = describe_bench_model(artifact)
    client = runner.client()
    import qai_hub

    with tempfile.TemporaryDirectory(suffix=".onnx") as folder:  # the hub takes a folder of .onnx (+ .data) only
        for file in graph:
            (Path(folder) / file.name).symlink_to(file.resolve())
        hub_device = qai_hub.Device(runner.connection.device)
        job = runner._call(client.submit_inference_job, runner._call(client.upload_model, folder), hub_device,
                           profile=True, options=runner.connection.options, name=f"edgeforge {Path(artifact).name}")
    status = runner._call(job.wait, timeout_s)
    if not status.success:
        raise RuntimeFailure(f"{runner._where()}: profile job {job.job_id} failed: {status.message}")
    return parse_profile(runner._call(job.download_profile), device=runner.connection.device, job_id=job.job_id,
                         artifact_sha256=content_sha256(model.path))


def _has_token(config_file: Path) -> bool:
    """Whether the client's config file holds an ``[api] api_token`` (read as the client reads it)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(config_file)
    except configparser.Error:
        return False
    return bool(parser.get("api", "api_token", fallback=""))
