"""ExecuTorch programs loaded in ``executorch.runtime``: the :class:`~edgeforge.export.artifact.Session` of
the exporter (decoders through the program's KV cache, sentence encoders in batch chunks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeforge.errors import InputError, RuntimeFailure
from edgeforge.export.executorch.graph import ENCODER_MAX_BATCH


def register_kernels() -> None:
    """Make the kernels our programs use outside the delegate available to this process's ExecuTorch
    runtime: ``llama::update_cache``/``custom_sdpa`` and ``quantized_decomposed::embedding_*``. The
    quantized library links against the portable runtime, so the order matters."""
    import importlib

    for module in ("executorch.extension.pybindings.portable_lib", "executorch.extension.llm.custom_ops.custom_ops",
                   "executorch.kernels.quantized"):
        importlib.import_module(module)


def load_method(model_file: Path, method: str = "forward"):
    """``method`` of a .pte loaded through ``executorch.runtime`` (imported here: it takes seconds). The
    runtime's own log lines (CPU probing on the first load) show only when loading fails."""
    register_kernels()
    from executorch.runtime import Runtime

    from edgeforge.quiet import held_native_stderr

    if not Path(model_file).is_file():
        raise InputError("no such ExecuTorch program", path=model_file)
    try:
        with held_native_stderr():
            return Runtime.get().load_program(Path(model_file)).load_method(method)
    except RuntimeError as exc:
        raise RuntimeFailure(f"ExecuTorch could not load method {method!r} ({exc})", path=model_file) from exc


class DecoderSession:
    """A decoder .pte in ``executorch.runtime``: ``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]``.

    The KV cache lives in the program. ``input_pos`` must be consecutive and continue the positions
    already fed (the custom ops take its first value and attend to the cache up to each position);
    start again at 0 to reset. Positions outside 0..max_seq_len-1 are refused.
    """

    def __init__(self, model_file: Path, *, max_seq_len: int):
        self.model_file, self.max_seq_len = Path(model_file), max_seq_len
        self._method = load_method(self.model_file)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        tokens, input_pos = tokens.to(torch.long).contiguous(), input_pos.to(torch.long).contiguous()
        if tokens.dim() != 2 or tokens.shape[0] != 1 or input_pos.shape != (tokens.shape[1],) or not len(input_pos):
            raise InputError(f"expected tokens [1, S] and input_pos [S], got {tuple(tokens.shape)} and "
                             f"{tuple(input_pos.shape)}", path=self.model_file)
        start = int(input_pos[0])
        if start < 0 or start + len(input_pos) > self.max_seq_len:
            raise InputError(f"positions {start}..{start + len(input_pos) - 1} outside the program's "
                             f"0..{self.max_seq_len - 1}", path=self.model_file)
        if not torch.equal(input_pos, torch.arange(start, start + len(input_pos))):
            raise InputError(f"input_pos must be consecutive positions, got {input_pos.tolist()}", path=self.model_file)
        return execute(self._method, [tokens, input_pos], self.model_file)

    __call__ = forward


class EncoderSession:
    """A sentence-encoder .pte: ``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]`` for inputs
    up to ``max_seq_len`` tokens (batches larger than the graph's run in chunks)."""

    def __init__(self, model_file: Path, *, max_seq_len: int):
        self.model_file, self.max_seq_len = Path(model_file), max_seq_len
        self._method = load_method(self.model_file)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        inputs = [t.to(torch.long).contiguous() for t in (input_ids, attention_mask, token_type_ids)]
        if inputs[0].dim() != 2 or not 0 < inputs[0].shape[1] <= self.max_seq_len:
            raise InputError(f"expected input_ids [B, S] with 1 <= S <= {self.max_seq_len}, got "
                             f"{tuple(inputs[0].shape)}", path=self.model_file)
        chunks = [execute(self._method, [t[start:start + ENCODER_MAX_BATCH] for t in inputs], self.model_file)
                  for start in range(0, inputs[0].shape[0], ENCODER_MAX_BATCH)]
        return torch.cat(chunks)


def execute(method, inputs: list[torch.Tensor], model_file: Path) -> torch.Tensor:
    """The method's first output, copied: it lives in the program's planned memory, which the next call reuses."""
    try:
        outputs = method.execute(inputs)
    except RuntimeError as exc:
        raise RuntimeFailure(f"ExecuTorch execution failed ({exc})", path=model_file) from exc
    return outputs[0].clone()
