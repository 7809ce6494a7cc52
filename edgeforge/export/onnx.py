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
from collections.abc import Callable
from pathlib import Path

from edgeforge.errors import UnsupportedError
from edgeforge.export.artifact import no_phase, register_exporter

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold a message over 2 GiB; tensors move to the external data file well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
EXTERNAL_TENSOR_MIN_BYTES = 1024  # tensors smaller than this stay inside model.onnx when data goes external
GENAI_CONFIG = "genai_config.json"
# The guard's limits for encoders with int8 activations, recorded in the report with the reason: the eager
# model rounds activations as onnxruntime does, but a last-bit float difference upstream of an int8 rounding
# (onnxruntime's fused LayerNorm and softmax against eager torch) now and then moves a value across a
# rounding boundary, and BERT's outlier channels make one step large. Cosine stays >= 0.995, while a wrong
# lowering (swapped nibbles, wrong scales) lands far below. Decoders take the scheme's own limits: every
# MatMulNBits matches the eager model's mlas-int8-block numerics to float32 summation order, static int8
# (w8a8-static, for NPUs) is checked with Q/DQ run as defined, and where chaos over many layers still moves
# top tokens the guard's second tier judges the artifact's drift from fp32 instead.
ENCODER_ACTIVATION_TOLERANCE = {"min_cosine": 0.995, "min_top1": 0.0}
ACTIVATION_REASON = ("last-bit float differences of fused kernels can move an activation across an int8 "
                     "rounding boundary")


@register_exporter
class OnnxExporter:
    name = "onnx"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int,
               phase: Callable[[str, str], None] = no_phase) -> dict:
        phase("build", "ONNX graph from the modules")
        import onnx

        from edgeforge.export.onnx_bert import build_encoder
        from edgeforge.export.onnx_llama import build_decoder

        builders = {"llama": build_decoder, "bert": build_encoder}
        if source.architecture not in builders:
            raise UnsupportedError(f"no ONNX graph for architecture {source.architecture!r} "
                                   f"(supported: {', '.join(builders)})")
        fused = target.backend == "cpu"  # GroupQueryAttention and the other onnxruntime CPU contrib kernels
        options = {"fused_attention": fused} if source.architecture == "llama" else {}
        graph = builders[source.architecture](source.model.eval(), max_seq_len=max_seq_len, **options)
        metadata = {"edgeforge.scheme": source.scheme, "edgeforge.architecture": source.architecture}
        phase("save", MODEL_FILE)
        model = save_model(graph, Path(out_dir) / MODEL_FILE, metadata=metadata)
        external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)
        report = {"model_file": MODEL_FILE, "external_data": EXTERNAL_DATA_FILE if external else None,
                  "opset": {domain.domain or "ai.onnx": domain.version for domain in model.opset_import},
                  **op_report(model, target.backend)}
        if _activation_schemes(source.model) and source.architecture == "bert":
            report["guard_tolerance"] = {**ENCODER_ACTIVATION_TOLERANCE, "reason": ACTIVATION_REASON}
        if source.architecture == "llama":
            report["genai"] = write_genai_files(source, Path(out_dir), max_seq_len=max_seq_len, share_buffer=fused)
        report["check_provider"] = _check_provider(target.backend)
        report["versions"] = versions()
        phase("validate", "onnx.checker")
        onnx.checker.check_model(str(Path(out_dir) / MODEL_FILE))
        return report

    def open(self, artifact_dir: Path, manifest: dict):
        from edgeforge.export import onnx_session

        backend = manifest["target"]["backend"]
        session = onnx_session.inference_session(Path(artifact_dir) / manifest["report"]["model_file"],
                                                 provider=onnx_session.provider_for(backend),
                                                 qdq_as_defined=onnx_session.stands_in(backend))
        if manifest["architecture"] == "bert":
            return onnx_session.OnnxEncoderSession(session)
        config = manifest["config"]
        head_dim = config.get("head_dim") or config["dim"] // config["n_heads"]
        return onnx_session.OnnxDecoderSession(session, n_layers=config["n_layers"],
                                               n_kv_heads=config.get("n_kv_heads") or config["n_heads"],
                                               head_dim=head_dim, max_seq_len=manifest["max_seq_len"])


def _check_provider(backend: str) -> str:
    """Which execution provider the guard (and verify/bench here) runs the artifact on, said plainly."""
    from edgeforge.export.onnx_session import PROVIDERS, provider_for

    provider = provider_for(backend)
    wanted = PROVIDERS.get(backend, provider)
    return provider if provider == wanted else (f"{provider} (this onnxruntime has no {wanted}; "
                                                "Q/DQ run as the ONNX spec defines them, not fused)")


def _activation_schemes(model) -> list[str]:
    """The quantized activation schemes (dynamic_int8, static_int8) the model's linears use."""
    found = {getattr(module, "activations", None) for module in model.modules()}
    return sorted(scheme.value for scheme in found if scheme is not None and scheme.value != "none")


def save_model(graph, path: Path, *, metadata: dict[str, str]):
    """Write ``graph`` to ``path``; its tensors go to ``model.onnx.data`` beside it when they add up to more
    than EXTERNAL_DATA_THRESHOLD_BYTES. Return the ModelProto written."""
    import onnx

    external = path.parent / EXTERNAL_DATA_FILE if graph.tensor_bytes > EXTERNAL_DATA_THRESHOLD_BYTES else None
    model = graph.model(producer="edgeforge", metadata=metadata, external_data=external,
                        external_min_bytes=EXTERNAL_TENSOR_MIN_BYTES)
    onnx.save_model(model, str(path))
    return model


def op_report(model, backend: str) -> dict:
    """Op counts; for the CPU provider also what it runs (the other providers' kernels are not in this
    onnxruntime build, so for them this is left out): ops with no CPU kernel at the model's opsets, and
    the share of parameter elements read by ops that have one."""
    counts = Counter(_op_name(node) for node in model.graph.node)
    report = {"total_ops": sum(counts.values()), "op_types": dict(sorted(counts.items()))}
    if backend != "cpu":
        return report
    runs = _cpu_kernel_check(model)
    outside = Counter(_op_name(node) for node in model.graph.node if not runs(node))
    sizes = {tensor.name: _elements(tensor.dims) for tensor in model.graph.initializer}
    read = [(sizes[name], runs(node)) for node in model.graph.node for name in node.input if name in sizes]
    total = sum(size for size, _ in read)
    report.update(delegated_ops=report["total_ops"] - sum(outside.values()), ops_outside_delegate=dict(outside),
                  delegated_parameter_share=round(sum(size for size, ok in read if ok) / max(total, 1), 4))
    return report


def _op_name(node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def _elements(dims) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def _cpu_kernel_check(model):
    """node -> whether onnxruntime's CPU provider has a kernel for its op at the model's opset."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    opsets = {domain.domain or "": domain.version for domain in model.opset_import}
    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            kernels.setdefault((kernel.domain or "", kernel.op_name), []).append(kernel.version_range)

    def runs(node) -> bool:
        version = opsets.get(node.domain or "", 1)
        return any(start <= version <= end for start, end in kernels.get((node.domain or "", node.op_type), []))

    return runs


def write_genai_files(source, out_dir: Path, *, max_seq_len: int, share_buffer: bool = False) -> dict:
    """genai_config.json, and tokenizer.json when the checkpoint's tokenizer is not one already.
    ``share_buffer``: the graph attends with GroupQueryAttention, which updates a max-length cache in place."""
    from edgeforge.checkpoints.tokenizers import end_of_sequence_ids
    from edgeforge.export.onnx_genai import genai_config, write_tokenizer_json
    from edgeforge.fileio import write_json_atomic

    tokenizer = source.tokenizer
    bos_id = getattr(tokenizer, "bos_id", None)
    eos_ids = end_of_sequence_ids(tokenizer)
    eos_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids or None  # genai_config takes an int or a list
    write_json_atomic(out_dir / GENAI_CONFIG, genai_config(source.config, max_seq_len=max_seq_len,
                                                           model_file=MODEL_FILE, bos_id=bos_id, eos_id=eos_id,
                                                           pad_id=getattr(tokenizer, "pad_id", None),
                                                           share_buffer=share_buffer))
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
