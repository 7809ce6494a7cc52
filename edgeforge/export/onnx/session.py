"""ONNX artifacts loaded in onnxruntime: the :class:`~edgeforge.export.artifact.Session` of the exporter.

The decoder session keeps the past keys/values between calls (``present`` of one call is ``past`` of
the next), so ``forward(tokens, input_pos)`` behaves like the eager model's static KV cache: positions
must continue the ones already fed, and a call starting at position 0 starts a new sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeforge.errors import InputError, RuntimeFailure, UnsupportedError

PROVIDERS = {"cpu": "CPUExecutionProvider", "qnn-htp": "QNNExecutionProvider"}


def provider_for(backend: str) -> str:
    """The target's execution provider where this onnxruntime has it, else the CPU provider (how a QNN
    target's QDQ graph is checked on a machine without a Qualcomm NPU, as its target file says)."""
    import onnxruntime

    provider = PROVIDERS.get(backend, "CPUExecutionProvider")
    return provider if provider in onnxruntime.get_available_providers() else "CPUExecutionProvider"


def stands_in(backend: str) -> bool:
    """Whether the CPU provider runs an artifact whose target's provider this onnxruntime lacks."""
    return provider_for(backend) != PROVIDERS.get(backend, "CPUExecutionProvider")


def inference_session(model_file: Path, *, provider: str = "CPUExecutionProvider", threads: int | None = None,
                      spin: bool = False, qdq_as_defined: bool = False):
    """An onnxruntime session on ``model_file`` (external data is read from beside it).

    threads: intra-op threads (onnxruntime's default: one per core). spin: let idle worker threads
    busy-wait for the next op (onnxruntime's default; lower latency, but the spinning threads take the
    cores from whatever runs between two calls, such as the eager model in the guard). qdq_as_defined:
    run QuantizeLinear/DequantizeLinear pairs as the ONNX spec defines them (float arithmetic on rounded
    values) instead of fusing them into the CPU provider's own int8 kernels, which compute something else
    (on AVX2 without VNNI their u8·s8 pair sums can saturate); for the CPU standing in for an NPU.
    """
    import onnxruntime

    from edgeforge.quiet import onnxruntime_severity

    onnxruntime.set_default_logger_severity(onnxruntime_severity())  # messages from outside the session
    options = onnxruntime.SessionOptions()
    options.log_severity_level = onnxruntime_severity()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if qdq_as_defined:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if provider not in onnxruntime.get_available_providers():
        raise RuntimeFailure(f"onnxruntime {onnxruntime.__version__} here has no {provider} (it has "
                             f"{', '.join(onnxruntime.get_available_providers())})")
    try:
        return onnxruntime.InferenceSession(str(model_file), options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types with C++ text
        raise RuntimeFailure(f"onnxruntime could not load {model_file}: {str(exc).splitlines()[0]}") from exc


def run(session, output_names: list[str], feeds: dict):
    try:
        return session.run(output_names, feeds)
    except Exception as exc:  # onnxruntime's Fail/InvalidArgument carry C++ text over several lines
        raise RuntimeFailure(f"onnxruntime failed to run the artifact: {str(exc).splitlines()[0]}") from exc


class OnnxDecoderSession:
    """``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]`` over an onnxruntime session."""

    def __init__(self, session, *, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int):
        self.session = session
        self.n_layers, self.n_kv_heads, self.head_dim, self.max_seq_len = n_layers, n_kv_heads, head_dim, max_seq_len
        self.output_names = [output.name for output in session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.n_kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past = {f"past_key_values.{i}.{kind}": empty for i in range(self.n_layers) for kind in ("key", "value")}
        self.length = 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        positions = input_pos.reshape(-1).to(torch.int64)
        if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] != positions.numel():
            raise InputError(f"forward takes tokens [1, S] and input_pos [S], got {tuple(tokens.shape)} "
                             f"and {tuple(input_pos.shape)}")
        start = int(positions[0])
        if start == 0:
            self.reset()
        if start != self.length or not torch.equal(positions, torch.arange(start, start + positions.numel())):
            raise InputError(f"input_pos must continue the sequence at position {self.length} (or restart at 0), "
                             f"got {positions.tolist()[:4]}...")
        if start + positions.numel() > self.max_seq_len:
            raise InputError(f"sequence of {start + positions.numel()} tokens exceeds the artifact's "
                             f"max_seq_len {self.max_seq_len}")
        feeds = {"input_ids": tokens.to(torch.int64).numpy(),
                 "attention_mask": np.ones((1, start + positions.numel()), dtype=np.int64),
                 "position_ids": positions[None].numpy(), **self.past}
        outputs = dict(zip(self.output_names, run(self.session, self.output_names, feeds)))
        self.past = {name.replace("present.", "past_key_values."): value for name, value in outputs.items()
                     if name.startswith("present.")}
        self.length = start + positions.numel()
        return torch.from_numpy(outputs["logits"])


class OnnxEncoderSession:
    """``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]`` over an onnxruntime session."""

    def __init__(self, session):
        self.session = session

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {name: tensor.to(torch.int64).numpy() for name, tensor in
                 (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids))}
        return torch.from_numpy(run(self.session, ["sentence_embedding"], feeds)[0])

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        raise UnsupportedError("an encoder artifact has no forward(tokens, input_pos); use embed(...)")


def check_provider(backend: str) -> str:
    """Which execution provider the guard (and verify/bench here) runs the artifact on, said plainly."""
    provider = provider_for(backend)
    wanted = PROVIDERS.get(backend, provider)
    return provider if provider == wanted else (f"{provider} (this onnxruntime has no {wanted}; "
                                                "Q/DQ run as the ONNX spec defines them, not fused)")
