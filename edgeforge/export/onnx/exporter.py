"""The ONNX exporter: an eager model (fp32 or edgeforge-quantized) -> an onnxruntime / onnxruntime-genai folder.

    model.onnx (+ model.onnx.data above EXTERNAL_DATA_THRESHOLD_BYTES)   the graph
    genai_config.json, tokenizer.json, tokenizer_config.json              decoders, for onnxruntime-genai

The graph is written from the weights with the ``onnx`` helper API, not traced with torch.onnx.export:
quantized layers must reach the file as the exact integers and scales quantize produced (MatMulNBits
initializers, QDQ weights), the KV cache must take genai's past/present form rather than the eager
model's in-place static cache, and the ops chosen (MatMulNBits vs QDQ) depend on each layer's scheme.
Building from the modules gives all three directly, with no custom-op registration or graph surgery,
and takes well under a second where a dynamo export takes tens of seconds.

Lowering per layer scheme (see :mod:`.layers`):

    fp32                 MatMul                              8w   MatMulNBits bits=8 (float activations)
    8da8w                MatMulNBits bits=8 accuracy_level=4 4w   MatMulNBits bits=4 (float activations)
    8da4w                MatMulNBits bits=4 accuracy_level=4 w8a8-static  Q/DQ(input) -> MatMul(DQ(int8 W))
    embeddings           Gather (fp32), or Gather int8 rows then Cast and multiply by the row scale
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgeforge.export.artifact import no_phase
from edgeforge.export.onnx.lower import EXTERNAL_DATA_FILE, MODEL_FILE, op_report, save_model, write_genai_files
from edgeforge.export.onnx.session import (OnnxDecoderSession, OnnxEncoderSession, check_provider, inference_session,
                                           provider_for, stands_in)
from edgeforge.export.tolerance import widened_tolerance
from edgeforge.models import architecture
from edgeforge.models.architecture import DECODER, ENCODER, family_choice

class OnnxExporter:
    name = "onnx"
    runtime_package = "onnxruntime"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int,
               phase: Callable[[str, str], None] = no_phase) -> dict:
        phase("build", "ONNX graph from the modules")
        import onnx

        from edgeforge.export.onnx.graph import build_decoder, build_encoder

        fused = target.backend == "cpu"  # GroupQueryAttention and the other onnxruntime CPU contrib kernels
        build = family_choice(source.architecture, {
            DECODER: lambda model: build_decoder(model, max_seq_len=max_seq_len, fused_attention=fused),
            ENCODER: lambda model: build_encoder(model, max_seq_len=max_seq_len)}, "ONNX graph")
        graph = build(source.model.eval())
        metadata = {"edgeforge.scheme": source.scheme, "edgeforge.architecture": source.architecture}
        phase("save", MODEL_FILE)
        model = save_model(graph, Path(out_dir) / MODEL_FILE, metadata=metadata)
        external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)
        report = {"model_file": MODEL_FILE, "external_data": EXTERNAL_DATA_FILE if external else None,
                  "opset": {domain.domain or "ai.onnx": domain.version for domain in model.opset_import},
                  **op_report(model, target.backend)}
        tolerance = widened_tolerance(source)
        if tolerance:
            report["guard_tolerance"] = tolerance
        genai_model_type = architecture(source.architecture).genai_model_type
        if genai_model_type is not None:
            report["genai"] = write_genai_files(source, Path(out_dir), model_type=genai_model_type,
                                                max_seq_len=max_seq_len, share_buffer=fused)
        report["check_provider"] = check_provider(target.backend)
        report["versions"] = versions()
        phase("validate", "onnx.checker")
        onnx.checker.check_model(str(Path(out_dir) / MODEL_FILE))
        return report

    def open(self, artifact_dir: Path, record):
        backend = record.target.backend
        session = inference_session(Path(artifact_dir) / record.report.model_file,
                                    provider=provider_for(backend), qdq_as_defined=stands_in(backend))
        config = record.model_config()
        open_session = family_choice(record.architecture, {
            DECODER: lambda: OnnxDecoderSession(session, n_layers=config.n_layers, n_kv_heads=config.n_kv_heads,
                                                head_dim=config.head_dim, max_seq_len=record.max_seq_len),
            ENCODER: lambda: OnnxEncoderSession(session)}, "ONNX session")
        return open_session()

    def prepare_runtime(self, threads: int) -> str:
        """Import onnxruntime; its session's intra-op pool is sized by open(), not here."""
        import onnxruntime  # noqa: F401

        return ", onnxruntime's default intra-op pool (not set by bench; bounded by the affinity)"


def versions() -> dict:
    import onnx
    import onnxruntime

    found = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxruntime_genai

        found["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    return found
