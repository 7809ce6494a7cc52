"""verify on a farm device: the artifact's forward passes run there, in the runtime installed there, and
everything else (tokenizing, windows, the reference, statistics, gates, the report) stays on this host.

    device = load_farm("farm.toml").select("pi5")[0]
    model = open_on_device("llama-int4.pte.d", device)       # uploaded, loaded by edgeforge's worker there
    vocab, inputs = model.drift_inputs(windows, topk_ids)    # what verify's statistics read, per window
    model.session.first_logits                               # the first window's full logits [L, V], float32
    model.close()

The device gets each window's token ids and the reference's top-k ids for it (once each) and answers with
:func:`edgeforge.verify.reference.drift_inputs` of the logits it computed: the log-probs at those ids, the log of
the rest, the target's log-prob and the argmax (4k + 24 bytes per position, 128 KiB for a 256-token window at
k = 128, where the logits are 4V bytes per position: 48 MiB for SmolLM2's 49152). They are computed there by the
same code a local verify runs on the same logits, and sent as their raw bytes, so the statistics made from them
here are bit-identical to a local run's on the same logits. The first window also sends its full logits once, so
two devices can be compared token by token.

Any runner whose prepared models are edgeforge's worker (:class:`edgeforge.runners.local.WorkerModel`: ``local``,
``ssh``) can do it; the worker's ``drift_window`` request calls :func:`device_window` beside the loaded session.
On the device that imports numpy, torch (the worker and the artifact sessions hand tensors around) and the
artifact's runtime (``executorch`` for .pte, ``onnxruntime`` for ONNX).
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from edgeforge.errors import ConfigError
from edgeforge.verify.models import EvalModel, ModelInfo, open_for_eval, runtime_window_logits
from edgeforge.verify.reference import drift_inputs


def encode_array(tensor: torch.Tensor) -> dict:
    """A tensor as JSON: its little-endian bytes in base64, dtype and shape (exact, unlike decimal text)."""
    array = tensor.detach().contiguous().numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(encoded: dict) -> torch.Tensor:
    """The tensor :func:`encode_array` encoded."""
    array = np.frombuffer(base64.b64decode(encoded["data"]), dtype=np.dtype(encoded["dtype"]))
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True).reshape(encoded["shape"]))


def device_window(session, tokens: list[int], topk_ids: dict, with_logits: bool) -> dict:
    """The worker's side of one window: its logits through ``session`` (one prefill from position 0), and the
    drift inputs at the reference's top-k ids; the logits themselves too when asked."""
    window = torch.tensor([tokens], dtype=torch.long)
    logits = runtime_window_logits(session, window)[0]
    inputs = drift_inputs(logits, decode_array(topk_ids), window[0, 1:])
    reply = {"vocab": logits.shape[-1], "inputs": {name: encode_array(value) for name, value in inputs.items()}}
    if with_logits:
        reply["logits"] = encode_array(logits.float())
    return reply


class DeviceSession:
    """An artifact loaded by edgeforge's worker on a farm device, answering :meth:`DeviceModel.drift_inputs`.

    record: the report's ``device`` section (:class:`edgeforge.verify.report.MeasuringDevice`);
    first_logits: the first window's logits [L, V] (float32) once a window has run.
    """

    def __init__(self, device, info: ModelInfo, say):
        from edgeforge.fileio import content_sha256
        from edgeforge.runners.conditions import Provenance
        from edgeforge.runners.farm import runner_for
        from edgeforge.runners.local import WorkerModel
        from edgeforge.verify.bench_models import describe_bench_model
        from edgeforge.verify.report import MeasuringDevice

        runner = runner_for(device)
        say(f"device {device.name} ({runner.name}): reaching it ...")
        environment = runner.environment(threads=None)
        self.prepared = runner.prepare(describe_bench_model(info.path), environment)
        try:
            if not isinstance(self.prepared, WorkerModel):
                raise ConfigError(f"device {device.name!r}: the {runner.name} runner does not run edgeforge's worker, "
                                  "which verify needs for the logits (devices of kind local or ssh do)")
            say(f"device {device.name}: loading {info.path.name} ({info.format}) there ...")
            load = self.prepared.load()
            identity = self.prepared.identity()
        except BaseException:
            self.close()
            raise
        provenance = Provenance(artifact_sha256=content_sha256(info.path), threads=environment.threads,
                                cores=environment.cores, **identity)
        self.record = MeasuringDevice(name=device.name, runner=runner.name, labels=dict(device.labels),
                                      versions=environment.machine.get("versions", {}), load_s=load.load_s,
                                      provenance=provenance)
        self.first_logits: torch.Tensor | None = None

    def drift_inputs(self, windows: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[dict]]:
        """(the device's vocabulary, drift inputs of each window [B, L] at the top-k ids [B, L-1, k])."""
        vocab, inputs = 0, []
        for row in range(windows.shape[0]):
            reply = self.prepared.worker.channel.call("drift_window", tokens=windows[row].tolist(),
                                                      topk_ids=encode_array(topk_ids[row].to(torch.int32)),
                                                      with_logits=self.first_logits is None)
            if "logits" in reply:
                self.first_logits = decode_array(reply["logits"])
            vocab = reply["vocab"]
            inputs.append({name: decode_array(value) for name, value in reply["inputs"].items()})
        return vocab, inputs

    def close(self) -> None:
        """End the worker on the device (and its connection)."""
        self.prepared.__exit__(None, None, None)


class DeviceModel(EvalModel):
    """An artifact under evaluation whose windows run on a farm device (its session a :class:`DeviceSession`)."""

    def drift_inputs(self, windows: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[dict]]:
        return self.session.drift_inputs(windows, topk_ids)

    def close(self) -> None:
        """End the worker on the device."""
        self.session.close()


def open_on_device(path, device, *, say=lambda message: None) -> DeviceModel:
    """An artifact (described here, its hash and lineage read here) whose forward passes run on the farm
    ``device``; :meth:`DeviceModel.close` ends the worker there."""
    from edgeforge.models import architecture

    def session(info: ModelInfo) -> DeviceSession:
        if info.kind != "artifact":
            raise ConfigError(f"--device runs an exported artifact in its runtime there; this is a {info.kind} "
                              "model (verify it here, without --farm)", path=info.path)
        if not architecture(info.architecture).generates_text:
            raise ConfigError(f"--device verifies decoders; this is a {info.architecture} model", path=info.path)
        return DeviceSession(device, info, say)

    return open_for_eval(path, session=session, model=DeviceModel)
