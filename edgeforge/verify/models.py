"""The model under test, whatever form it ships in, opened one way for verify and bench.

    path                                  kind        format   runs in
    exported artifact (edgeforge.json,    artifact    pte      ExecuTorch, through ``Artifact.open()``
      kind edgeforge.artifact)                        onnx     onnxruntime, through ``Artifact.open()``
    edgeforge quantized checkpoint        quantized   eager    torch, with QuantizedLinear modules
    any checkpoint edgeforge loads        checkpoint  eager    torch, fp32

``kind`` says what the path holds, ``format`` how it runs: its runtime's artifact format, or ``eager``.
:func:`describe_model` reads records and headers only (no weights); :func:`open_session` loads the
model behind the session protocol the exported artifacts' sessions implement (:class:`EagerSession` for
eager models): decoders answer ``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]``,
encoders ``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]``. :func:`open_for_eval` is
both, plus the content hash and :class:`~edgeforge.verify.lineage.Lineage` verify needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgeforge.errors import InputError
from edgeforge.fileio import content_sha256, read_json
from edgeforge.verify.lineage import MANIFEST, Lineage, artifact_lineage, quantized_lineage

EAGER = "eager"  # the format of a model run by torch itself


@dataclass(frozen=True)
class ModelInfo:
    """A model described from its records and headers, without loading its weights.

    record: the artifact's ``ArtifactRecord`` or the quantized checkpoint's ``QuantizedCheckpoint`` (None for a
    plain checkpoint);
    checkpoint: the opened (lazy) checkpoint of kind ``checkpoint``, else None.
    max_seq_len: positions an artifact's graph holds; an eager model's context.
    """

    path: Path
    kind: str  # "artifact" | "quantized" | "checkpoint"
    format: str  # "pte" | "onnx" | "eager"
    architecture: str  # "llama" | "bert"
    scheme: str  # "fp32", "8da4w", ...
    max_seq_len: int
    record: object | None  # ArtifactRecord | QuantizedCheckpoint | None
    checkpoint: object | None = None


def describe_model(path: str | Path) -> ModelInfo:
    """An artifact, a quantized checkpoint or a plain checkpoint, told apart by its record's kind."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    kind = read_json(path / MANIFEST).get("kind") if (path / MANIFEST).is_file() else None
    if kind == "edgeforge.artifact":
        from edgeforge.export import open_artifact

        record = open_artifact(path).record
        return ModelInfo(path=path, kind="artifact", format=record.format, architecture=record.architecture,
                         scheme=record.scheme, max_seq_len=record.max_seq_len, record=record)
    if kind == "edgeforge.quantized_checkpoint":
        from edgeforge.quantize import read_quantized

        record = read_quantized(path)
        return ModelInfo(path=path, kind="quantized", format=EAGER, architecture=record.architecture,
                         scheme=record.scheme, max_seq_len=record.model_config().max_seq_len, record=record)
    from edgeforge.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(path)
    return ModelInfo(path=checkpoint.path, kind="checkpoint", format=EAGER, architecture=checkpoint.architecture,
                     scheme="fp32", max_seq_len=checkpoint.config.max_seq_len, record=None, checkpoint=checkpoint)


class EagerSession:
    """An eager model (fp32 or edgeforge-quantized) behind the artifact session protocol.

    ``forward`` runs through the model's static KV cache, allocated for ``max_seq_len`` positions on first
    use (or at once with ``allocate_cache()``); ``window_logits`` takes a batch of windows through plain
    causal attention, the computation of a prefill into an empty cache.
    """

    def __init__(self, model: torch.nn.Module, *, max_seq_len: int):
        self.model, self.max_seq_len = model, max_seq_len

    def allocate_cache(self) -> None:
        if self.model.cache_len != self.max_seq_len:
            self.model.setup_cache(1, self.max_seq_len)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.allocate_cache()
        with torch.inference_mode():
            return self.model(tokens, input_pos)

    def window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(windows)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(input_ids, attention_mask, token_type_ids)


def prepare_runtime(format: str, *, threads: int) -> str:
    """Import what opening a model of ``format`` needs (an artifact's runtime, from its exporter) and size that
    runtime's threads; return how its threads were set ("" for eager models: torch's setting applies)."""
    if format != EAGER:
        from edgeforge.export.artifact import exporter_for

        return exporter_for(format).prepare_runtime(threads)
    import edgeforge.quantize  # noqa: F401  (what opening a quantized checkpoint imports, timed apart from loading)
    return ""


def open_session(model: ModelInfo, *, max_seq_len: int | None = None):
    """Load ``model`` in its runtime (artifacts) or in torch (an :class:`EagerSession`).

    max_seq_len: an eager model's KV-cache length, allocated now (bench times it as part of loading);
    None: the model's context, allocated on the first ``forward``. Artifacts hold the length they were
    exported with.
    """
    if model.kind == "artifact":
        from edgeforge.export import open_artifact

        return open_artifact(model.path).open()
    if model.kind == "quantized":
        from edgeforge.quantize import load_quantized_model

        session = EagerSession(load_quantized_model(model.path), max_seq_len=max_seq_len or model.max_seq_len)
    else:
        from edgeforge.checkpoints import load_model

        session = EagerSession(load_model(model.checkpoint), max_seq_len=max_seq_len or model.max_seq_len)
    if max_seq_len is not None:
        session.allocate_cache()
    return session


@dataclass
class EvalModel:
    """A model opened for evaluation: its description, its session, content hash and lineage."""

    info: ModelInfo
    sha256: str
    lineage: Lineage
    session: object

    path = property(lambda self: self.info.path)
    kind = property(lambda self: self.info.kind)
    format = property(lambda self: self.info.format)
    architecture = property(lambda self: self.info.architecture)
    scheme = property(lambda self: self.info.scheme)
    max_seq_len = property(lambda self: self.info.max_seq_len)

    @property
    def eager(self) -> bool:
        return self.format == EAGER

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Decoder logits [1, S, vocab] for ``tokens`` [1, S] at positions ``input_pos`` [S] (KV cache kept)."""
        return self.session.forward(tokens, input_pos)

    def window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] of windows [B, L], each fed as one prefill from position 0.

        Eager models take the whole batch at once; a runtime session takes one window per call.
        """
        if self.eager:
            return self.session.window_logits(windows)
        return runtime_window_logits(self.session, windows)

    def drift_inputs(self, windows: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[dict]]:
        """(vocabulary, :func:`~edgeforge.verify.reference.drift_inputs` of each window [B, L] at the reference's
        top-k ids [B, L-1, k]), from logits computed here (a device's model computes them there:
        :class:`edgeforge.verify.remote.DeviceModel`)."""
        from edgeforge.verify.reference import drift_inputs

        logits = self.window_logits(windows)
        return logits.shape[-1], [drift_inputs(logits[row], topk_ids[row], windows[row, 1:])
                                  for row in range(windows.shape[0])]

    def close(self) -> None:
        """Free what the model holds beyond this process (a device's worker); a local session holds nothing."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, dim] of an encoder."""
        with torch.inference_mode():
            return self.session.embed(input_ids, attention_mask, token_type_ids)

    def describe(self) -> dict:
        return {"path": str(Path(self.path).resolve()), "sha256": self.sha256, "kind": self.kind, "format": self.format,
                "architecture": self.architecture, "scheme": self.scheme, "recipe": self.lineage.recipe,
                "max_seq_len": self.max_seq_len, "bits_per_weight": self.lineage.bits_per_weight}


def runtime_window_logits(session, windows: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, vocab] of windows [B, L] through an artifact's runtime session, one prefill from position 0
    per window (the KV cache starts again at 0)."""
    positions = torch.arange(windows.shape[1])
    with torch.inference_mode():
        return torch.cat([session.forward(row[None], positions) for row in windows])


def open_for_eval(path: str | Path, *, session=open_session, model: type[EvalModel] = EvalModel) -> EvalModel:
    """Open an artifact, a quantized checkpoint or a plain checkpoint for evaluation (kind from its record).

    session: makes the model's session from its :class:`ModelInfo` (default: loaded here, in its runtime);
    model: the EvalModel class that holds it."""
    info = describe_model(path)
    if info.kind == "checkpoint":
        sha256 = info.checkpoint.content_hash()
        lineage = Lineage(source_sha256=sha256)
    else:
        sha256 = content_sha256(info.path)
        lineage = (artifact_lineage if info.kind == "artifact" else quantized_lineage)(info.path, info.record)
    return model(info=info, sha256=sha256, lineage=lineage, session=session(info))
