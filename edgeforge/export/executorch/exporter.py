"""The ExecuTorch exporter: a Llama decoder or a sentence encoder (fp32 or edgeforge-quantized) -> ``model.pte``.

    eager model ──swap──▶ export variant ──torch.export──▶ ExportedProgram ──XNNPACK──▶ model.pte
                          (:mod:`.graph`, :mod:`.layers`)                    (:mod:`.lower`)

The decoder's .pte carries the metadata methods ExecuTorch's LLM runner reads (``get_max_seq_len`` ...),
and export() copies the tokenizer beside it, so the artifact runs unchanged in
``executorch.extension.llm.runner`` as well as through :class:`~.session.DecoderSession`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgeforge.checkpoints.tokenizers import end_of_sequence_ids
from edgeforge.export.artifact import no_phase
from edgeforge.export.executorch.graph import export_program
from edgeforge.export.executorch.lower import check_backend, delegation_report, lower
from edgeforge.export.executorch.session import DecoderSession, EncoderSession, register_kernels
from edgeforge.export.tolerance import widened_tolerance
from edgeforge.models import architecture
from edgeforge.models.architecture import DECODER, ENCODER, family_choice
from edgeforge.provenance import package_versions

MODEL_FILE = "model.pte"


class ExecuTorchExporter:
    """``pte``: ExecuTorch program with the target's delegate (XNNPACK), plus the LLM runner's metadata."""

    name = "pte"
    runtime_package = "executorch"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int,
               phase: Callable[[str, str], None] = no_phase) -> dict:
        check_backend(target.backend)
        phase("trace", "torch.export")
        program = export_program(source, max_seq_len=max_seq_len, backend=target.backend)
        metadata = runner_metadata(source, max_seq_len=max_seq_len, dynamic_shape=target.backend != "coreml") \
            if architecture(source.architecture).generates_text else None
        phase("lower", f"to_edge_transform_and_lower, {target.backend} partitions")
        executorch_program = lower(program, backend=target.backend, metadata=metadata, phase=phase)
        phase("serialize", MODEL_FILE)
        (out_dir / MODEL_FILE).write_bytes(executorch_program.buffer)
        planned = executorch_program.executorch_program.execution_plan[0].non_const_buffer_sizes
        report = {"model_file": MODEL_FILE, **delegation_report(executorch_program.exported_program()),
                  "planned_memory_bytes": sum(planned),  # activations and KV cache, at the shapes' upper bounds
                  "runner_metadata": metadata, "runner_tokenizer": _runner_tokenizer(source),
                  "versions": package_versions("executorch", "torchao")}
        tolerance = widened_tolerance(source)
        if tolerance:
            report["guard_tolerance"] = tolerance
        return report

    def open(self, artifact_dir: Path, record):
        model_file = Path(artifact_dir) / record.report.model_file
        session_class = family_choice(record.architecture, {DECODER: DecoderSession, ENCODER: EncoderSession},
                                      "ExecuTorch session")
        return session_class(model_file, max_seq_len=record.max_seq_len)

    def prepare_runtime(self, threads: int) -> str:
        """Import the ExecuTorch runtime and the kernels our programs use, and size its threadpool (it
        ignores torch's setting)."""
        import executorch.runtime  # noqa: F401
        from executorch.extension.pybindings import portable_lib

        register_kernels()
        portable_lib._unsafe_reset_threadpool(threads)
        return f", ExecuTorch threadpool reset to {portable_lib._threadpool_get_thread_count()}"


def _runner_tokenizer(source) -> str | None:
    """The tokenizer file (copied beside the .pte by export()) to hand ExecuTorch's LLM runner, which reads
    tokenizer.json, SentencePiece .model, tiktoken and llama2.c .bin files; None without one (or for a model
    that does not generate text)."""
    if not architecture(source.architecture).generates_text or not source.tokenizer_files:
        return None
    return source.tokenizer_files[0].name


def runner_metadata(source, *, max_seq_len: int, dynamic_shape: bool = True) -> dict:
    """Constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h): one prefill
    call may fill the whole cache, so max_seq_len (longest call) and max_context_len (cache) agree.
    get_bos_id is informational (the runner takes BOS from its tokenizer and prepends GenerationConfig.num_bos
    of them: 1 where the manifest's tokenizer.adds_bos, else 0); get_eos_ids lists every id ending generation.
    ``dynamic_shape`` False: a one-token program (CoreML), which the runner prefills token by token."""
    config, tokenizer = source.config, source.tokenizer
    metadata = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                "get_vocab_size": config.vocab_size, "get_n_layers": config.n_layers, "use_kv_cache": True,
                "use_sdpa_with_kv_cache": dynamic_shape, "enable_dynamic_shape": dynamic_shape}
    if tokenizer is not None and tokenizer.bos_id is not None:
        metadata["get_bos_id"] = tokenizer.bos_id
    eos_ids = end_of_sequence_ids(tokenizer)
    if eos_ids:
        metadata["get_eos_ids"] = eos_ids
    return metadata
