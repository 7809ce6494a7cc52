"""The ONNX graph on disk: ``model.onnx`` (+ ``model.onnx.data`` above EXTERNAL_DATA_THRESHOLD_BYTES), what
its ops are and which the CPU provider runs, and onnxruntime-genai's side of a decoder artifact:
``genai_config.json`` and a Hugging Face ``tokenizer.json`` (:mod:`edgeforge.checkpoints.tokenizer_json`).

genai reads the decoder's input/output names and shapes from the "decoder" section of genai_config.json
(what onnxruntime-genai's own model builder writes for a CPU model: past and present as separate
buffers, ``past_present_share_buffer: false``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold a message over 2 GiB; tensors move to the external data file well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
EXTERNAL_TENSOR_MIN_BYTES = 1024  # tensors smaller than this stay inside model.onnx when data goes external
GENAI_CONFIG = "genai_config.json"


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


def genai_config(config, *, model_type: str, max_seq_len: int, model_file: str, bos_id: int | None,
                 eos_id: int | list[int] | None, pad_id: int | None, share_buffer: bool = False) -> dict:
    """The genai_config.json of a decoder artifact (``model_type``: genai's name for the architecture, its
    ``genai_model_type``; greedy search by default; ``eos_id`` may list several; ``share_buffer``: past and
    present key/values are one max-length buffer updated in place)."""
    from edgeforge.export.onnx.graph import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

    genai = {
        "model": {
            "bos_token_id": bos_id,
            "context_length": max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": config.head_dim,
                "hidden_size": config.dim,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY.replace("{}", "%d"),
                           "past_value_names": PAST_VALUE.replace("{}", "%d")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY.replace("{}", "%d"),
                            "present_value_names": PRESENT_VALUE.replace("{}", "%d")},
                "num_attention_heads": config.n_heads,
                "num_hidden_layers": config.n_layers,
                "num_key_value_heads": config.n_kv_heads,
            },
            "eos_token_id": eos_id,
            "pad_token_id": pad_id if pad_id is not None else (eos_id if isinstance(eos_id, int) else
                                                                 eos_id[0] if eos_id else 0),
            "type": model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    for key in ("bos_token_id", "eos_token_id"):  # genai refuses null ids: without a tokenizer, leave them out
        if genai["model"][key] is None:
            del genai["model"][key]
    return genai


def write_genai_files(source, out_dir: Path, *, model_type: str, max_seq_len: int, share_buffer: bool = False) -> dict:
    """genai_config.json, and tokenizer.json when the checkpoint's tokenizer is not one already.
    ``share_buffer``: the graph attends with GroupQueryAttention, which updates a max-length cache in place."""
    from edgeforge.checkpoints.tokenizers import end_of_sequence_ids
    from edgeforge.checkpoints.tokenizer_json import write_tokenizer_json
    from edgeforge.fileio import write_json_atomic

    tokenizer = source.tokenizer
    bos_id = getattr(tokenizer, "bos_id", None)
    eos_ids = end_of_sequence_ids(tokenizer)
    eos_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids or None  # genai_config takes an int or a list
    write_json_atomic(out_dir / GENAI_CONFIG, genai_config(source.config, model_type=model_type,
                                                           max_seq_len=max_seq_len, model_file=MODEL_FILE,
                                                           bos_id=bos_id, eos_id=eos_id,
                                                           pad_id=getattr(tokenizer, "pad_id", None),
                                                           share_buffer=share_buffer))
    if any(file.name == "tokenizer.json" for file in source.tokenizer_files):
        return {"config": GENAI_CONFIG, "tokenizer": "tokenizer.json (from the checkpoint)"}
    problem = write_tokenizer_json(tokenizer, out_dir)
    if problem is not None:
        return {"config": GENAI_CONFIG, "tokenizer": None, "tokenizer_missing": problem}
    return {"config": GENAI_CONFIG, "tokenizer": f"tokenizer.json (converted from {Path(tokenizer.source).name})"}
