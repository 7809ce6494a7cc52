"""The ONNX exporter: an eager model (fp32 or edgeforge-quantized) -> an onnxruntime / onnxruntime-genai folder.

    model.onnx (+ model.onnx.data above EXTERNAL_DATA_THRESHOLD_BYTES)   the graph
    genai_config.json, tokenizer.json, tokenizer_config.json              decoders, for onnxruntime-genai

The graph is written from the weights with the ``onnx`` helper API, not traced with torch.onnx.export:
quantized layers must reach the file as the exact integers and scales quantize produced (MatMulNBits
initializers, QDQ weights), the KV cache must take genai's past/present form rather than the eager
model's in-place static cache, and the ops chosen (MatMulNBits vs QDQ) depend on each layer's scheme.
Building from the modules gives all three directly, with no custom-op registration or graph surgery,
and takes well under a second where a dynamo export takes tens of seconds.

Lowering per layer scheme (see :mod:`edgeforge.export.onnx_graph`):

    fp32                 MatMul                              8w   MatMulNBits bits=8 (float activations)
    8da8w                MatMulNBits bits=8 accuracy_level=4 4w   MatMulNBits bits=4 (float activations)
    8da4w                MatMulNBits bits=4 accuracy_level=4 w8a8-static  Q/DQ(input) -> MatMul(DQ(int8 W))
    embeddings           Gather (fp32), or Gather int8 rows then Cast and multiply by the row scale
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgeforge.errors import UnsupportedError
from edgeforge.export.artifact import register_exporter

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold a message over 2 GiB; tensors move to the external data file well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
EXTERNAL_TENSOR_MIN_BYTES = 1024  # tensors smaller than this stay inside model.onnx when data goes external
GENAI_CONFIG = "genai_config.json"


@register_exporter
class OnnxExporter:
    name = "onnx"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int) -> dict:
        import onnx

        from edgeforge.export.onnx_bert import build_encoder
        from edgeforge.export.onnx_llama import build_decoder

        builders = {"llama": build_decoder, "bert": build_encoder}
        if source.architecture not in builders:
            raise UnsupportedError(f"no ONNX graph for architecture {source.architecture!r} "
                                   f"(supported: {', '.join(builders)})")
        graph = builders[source.architecture](source.model.eval(), max_seq_len=max_seq_len)
        model = graph.model(producer="edgeforge", metadata={"edgeforge.scheme": source.scheme,
                                                            "edgeforge.architecture": source.architecture})
        external = save_model(model, Path(out_dir) / MODEL_FILE)
        report = {"model_file": MODEL_FILE, "external_data": EXTERNAL_DATA_FILE if external else None,
                  "opset": {domain.domain or "ai.onnx": domain.version for domain in model.opset_import},
                  **op_report(model, target.backend)}
        if source.architecture == "llama":
            report["genai"] = write_genai_files(source, Path(out_dir), max_seq_len=max_seq_len)
        report["versions"] = versions()
        onnx.checker.check_model(str(Path(out_dir) / MODEL_FILE))
        return report

    def open(self, artifact_dir: Path, manifest: dict):
        from edgeforge.export.onnx_session import (OnnxDecoderSession, OnnxEncoderSession, inference_session,
                                                   provider_for)

        session = inference_session(Path(artifact_dir) / manifest["report"]["model_file"],
                                    provider=provider_for(manifest["target"]["backend"]))
        if manifest["architecture"] == "bert":
            return OnnxEncoderSession(session)
        config = manifest["config"]
        head_dim = config.get("head_dim") or config["dim"] // config["n_heads"]
        return OnnxDecoderSession(session, n_layers=config["n_layers"],
                                  n_kv_heads=config.get("n_kv_heads") or config["n_heads"], head_dim=head_dim,
                                  max_seq_len=manifest["max_seq_len"])


def save_model(model, path: Path, *, threshold_bytes: int | None = None) -> bool:
    """Write ``model``; tensors go to ``model.onnx.data`` beside it when the model is larger than the
    threshold (default EXTERNAL_DATA_THRESHOLD_BYTES). Return whether external data was written."""
    import onnx

    threshold = EXTERNAL_DATA_THRESHOLD_BYTES if threshold_bytes is None else threshold_bytes
    external = model.ByteSize() > threshold
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=EXTERNAL_TENSOR_MIN_BYTES)
    else:
        onnx.save_model(model, str(path))
    return external


def op_report(model, backend: str) -> dict:
    """Op counts, and for the CPU provider the ops it has no kernel for at the model's opsets."""
    counts = Counter(node.op_type if not node.domain else f"{node.domain}::{node.op_type}" for node in model.graph.node)
    report = {"total_ops": sum(counts.values()), "op_types": dict(sorted(counts.items()))}
    if backend == "cpu":
        report["ops_outside_ep"] = _ops_without_cpu_kernel(model)
    return report


def _ops_without_cpu_kernel(model) -> dict[str, int]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    opsets = {domain.domain or "": domain.version for domain in model.opset_import}
    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            kernels.setdefault((kernel.domain or "", kernel.op_name), []).append(kernel.version_range)
    missing: Counter = Counter()
    for node in model.graph.node:
        version = opsets.get(node.domain or "", 1)
        ranges = kernels.get((node.domain or "", node.op_type), [])
        if not any(start <= version <= end for start, end in ranges):
            missing[node.op_type if not node.domain else f"{node.domain}::{node.op_type}"] += 1
    return dict(missing)


def write_genai_files(source, out_dir: Path, *, max_seq_len: int) -> dict:
    """genai_config.json, and tokenizer.json when the checkpoint's tokenizer is not one already."""
    from edgeforge.export.onnx_genai import genai_config, write_tokenizer_json
    from edgeforge.fileio import write_json_atomic

    tokenizer = source.tokenizer
    bos_id = getattr(tokenizer, "bos_id", None)
    eos_id = getattr(tokenizer, "eos_id", None)
    write_json_atomic(out_dir / GENAI_CONFIG, genai_config(source.config, max_seq_len=max_seq_len,
                                                           model_file=MODEL_FILE, bos_id=bos_id, eos_id=eos_id,
                                                           pad_id=getattr(tokenizer, "pad_id", None)))
    if any(file.name == "tokenizer.json" for file in source.tokenizer_files):
        return {"config": GENAI_CONFIG, "tokenizer": "tokenizer.json (from the checkpoint)"}
    problem = write_tokenizer_json(tokenizer, out_dir)
    if problem is not None:
        return {"config": GENAI_CONFIG, "tokenizer": None, "tokenizer_missing": problem}
    return {"config": GENAI_CONFIG, "tokenizer": f"tokenizer.json (converted from {Path(tokenizer.source).name})"}


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
