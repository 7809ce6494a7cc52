"""ExecuTorch exporter: a Llama decoder or a sentence encoder (fp32 or edgeforge-quantized) -> ``model.pte``.

    eager model ──swap──▶ export variant ──torch.export──▶ ExportedProgram ──XNNPACK──▶ model.pte
    (Transformer,         (the same tensors: ExecuTorch's     (non-strict; dynamic  (to_edge_transform_and_lower,
     BertEncoder)          KV-cache + SDPA ops, XNNPACK-       sequence length)      then to_executorch)
                           shaped norm and RoPE, torchao
                           tensors holding edgeforge's integers)

Quantized layers keep edgeforge's calibrated integers and scales: each becomes a torchao
``IntxUnpackedToInt8Tensor`` built from the checkpoint's ``qdata``/``scale``/``zero_point`` as they
are (nothing is re-quantized). XNNPACK runs linears with dynamic int8 activations as its 8da4w/8da8w
kernels; quantized embeddings become ExecuTorch's ``embedding_byte``/``embedding_4bit`` ops.

For the CoreML backend (target ios-coreml) the decoder is the core model with its static cache, one
token per call, lowered whole to one CoreML program; it runs on Apple devices only.

The decoder's .pte carries the metadata methods ExecuTorch's LLM runner reads (``get_max_seq_len`` ...),
and export() copies the tokenizer beside it, so the artifact runs unchanged in
``executorch.extension.llm.runner`` as well as through :class:`DecoderSession`.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.checkpoints.tokenizers import end_of_sequence_ids
from edgeforge.errors import InputError, RuntimeFailure, UnsupportedError
from edgeforge.export.artifact import no_phase, register_exporter

MODEL_FILE = "model.pte"
BACKENDS = ("xnnpack", "coreml")  # partitioners edgeforge lowers to
ENCODER_MAX_BATCH = 16  # largest batch the encoder graph takes: memory is planned for it (MiniLM: 162 MiB)
_BOOKKEEPING_OPS = {"sym_size", "_local_scalar_dense", "_assert_scalar", "sym_constrain_range_for_size"}
# Guard tolerance (min cosine, min top-1) where the eager model cannot follow XNNPACK (see guard_tolerance).
# A miscompile is far outside it: XNNPACK's int8 weight-only linear drops the scale (cosine -0.3 to 0.004).
ENCODER_INT8_TOLERANCE = (0.995, 0.0)  # sentence embeddings (no top-1); measured 0.9991 on MiniLM 8da8w

# ---- the decoder's export variant: same tensors, ExecuTorch's custom ops, XNNPACK-friendly shapes ----

class KVCache(nn.Module):
    """Static cache [1, max_seq_len, kv_heads, head_dim]: the layout ``llama.update_cache`` and
    ``llama.custom_sdpa`` read (sequence on dim 1, unlike the core's [B, H, S, D])."""

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int):
        super().__init__()
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """W [D, D] with ``F.linear(x, W) == cat(-x2, x1)``: the core's rotate-half as a linear, which XNNPACK
    runs inside the partition (exact: each output is one input times ±1)."""
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim)
    rotation[torch.arange(half), torch.arange(half) + half] = -1.0
    rotation[torch.arange(half) + half, torch.arange(half)] = 1.0
    return rotation


class SdpaAttention(nn.Module):
    """The core Attention's projections around ExecuTorch's ``update_cache`` + ``custom_sdpa`` ops.

    ``start_pos`` is an int: the first position of this call. Attention is causal over the cache up
    to each query's position, which is the core's mask when positions continue from the cache.
    Reshapes keep one dynamic dimension (``-1``) so XNNPACK can take them.
    """

    def __init__(self, attention: nn.Module, max_seq_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        self.kv_cache = KVCache(self.n_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("rotation", rotate_half_matrix(self.head_dim), persistent=False)

    def forward(self, x, cos, sin, start_pos, mask=None):
        # x: [1, S, dim]; cos, sin: [S, head_dim]; mask: unused (causal from start_pos)
        head_dim = self.head_dim
        q = self.wq(x).view(1, -1, self.n_heads, head_dim)  # [1, S, H, D]
        k = self.wk(x).view(1, -1, self.n_kv_heads, head_dim)
        v = self.wv(x).view(1, -1, self.n_kv_heads, head_dim)
        cos, sin = cos.view(1, -1, 1, head_dim), sin.view(1, -1, 1, head_dim)
        q = q * cos + F.linear(q, self.rotation) * sin
        k = k * cos + F.linear(k, self.rotation) * sin
        torch.ops.llama.update_cache(k, self.kv_cache.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.kv_cache.v_cache, start_pos)
        y = torch.ops.llama.custom_sdpa(q, self.kv_cache.k_cache, self.kv_cache.v_cache, start_pos, None, 0.0, True)
        return self.wo(y.view(1, -1, self.n_heads * head_dim))


class XnnpackRMSNorm(nn.Module):
    """The core RMSNorm with its mean taken over a 4-D view: XNNPACK delegates only that form of mean."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        dim = x.shape[-1]
        mean_square = x.view(1, -1, dim, 1).pow(2).mean((2, 3), keepdim=True).view(1, -1, 1)
        return x * torch.rsqrt(mean_square + self.eps) * self.weight


class ExportDecoder(nn.Module):
    """``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]`` over the core's modules, with
    attention and norms swapped for their export variants in ``core`` (pass a :func:`structural_copy`)."""

    def __init__(self, core: nn.Module, max_seq_len: int):
        super().__init__()
        for layer in core.layers:
            layer.attention = SdpaAttention(layer.attention, max_seq_len)
            layer.attention_norm, layer.ffn_norm = XnnpackRMSNorm(layer.attention_norm), XnnpackRMSNorm(layer.ffn_norm)
        core.norm = XnnpackRMSNorm(core.norm)
        rope_cos, rope_sin = core._buffers.pop("rope_cos"), core._buffers.pop("rope_sin")  # tables for the cache only
        self.register_buffer("rope_cos", rope_cos[:max_seq_len].clone(), persistent=False)
        self.register_buffer("rope_sin", rope_sin[:max_seq_len].clone(), persistent=False)
        self.core, self.max_seq_len = core, max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start_pos = input_pos[0].item()  # the custom ops take the first position as an int
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        x = self.core.tok_embeddings(tokens)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.core.layers:
            x = layer(x, cos, sin, start_pos)  # TransformerBlock hands start_pos on to SdpaAttention
        return self.core.output(self.core.norm(x))


def structural_copy(module: nn.Module) -> nn.Module:
    """New module objects over the same parameter and buffer tensors, so swaps leave the original alone."""
    clone = copy.copy(module)
    clone._modules = {name: structural_copy(child) for name, child in module._modules.items()}
    clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
    return clone


# ---- edgeforge's quantized modules as torchao tensors XNNPACK lowers ----

def to_torchao(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear/QuantizedEmbedding in ``model`` (in place) by nn.Linear/nn.Embedding
    holding a torchao ``IntxUnpackedToInt8Tensor`` made from the module's own integers and scales."""
    from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear, set_module
    from edgeforge.quantize.scheme import ActivationScheme

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            if module.activations is ActivationScheme.STATIC_INT8:
                raise UnsupportedError(f"{name}: static int8 activations have no ExecuTorch XNNPACK lowering "
                                       "here; export them to ONNX (target onnx-qnn-htp)")
            dynamic = module.activations is ActivationScheme.DYNAMIC_INT8
            linear = nn.Linear(module.in_features, module.out_features, bias=getattr(module, "bias", None) is not None,
                               device="meta")
            linear.weight = nn.Parameter(_intx_tensor(module, dynamic), requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            if module.input_multiplier is not None:
                linear = ScaledInput(module.input_multiplier, linear)
            set_module(model, name, linear)
        elif isinstance(module, QuantizedEmbedding):
            rows, dim = module.qdata.shape
            embedding = nn.Embedding(rows, dim, device="meta")
            embedding.weight = nn.Parameter(_intx_tensor(module, False), requires_grad=False)
            set_module(model, name, embedding)
    return model


class ScaledInput(nn.Module):
    """``linear(x * multiplier)``: a SmoothQuant input multiplier ahead of a quantized linear (XNNPACK runs the mul)."""

    def __init__(self, multiplier: torch.Tensor, linear: nn.Linear):
        super().__init__()
        self.register_buffer("multiplier", multiplier.detach().clone())
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.multiplier)


def _intx_tensor(module: nn.Module, dynamic_activations: bool):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    qdata, scale = module.qdata, module.scale
    zero_point = module.zero_point if module.zero_point is not None else torch.zeros(scale.shape, dtype=torch.int8)
    group_size = qdata.shape[1] // scale.shape[1]
    return IntxUnpackedToInt8Tensor(qdata, scale, zero_point, getattr(torch, f"int{module.scheme.bits}"),
                                    (1, group_size), torch.float32,
                                    "int8_asym_per_token" if dynamic_activations else None)


# ---- torch.export -> XNNPACK -> .pte ----

def export_program(source, *, max_seq_len: int, backend: str = "xnnpack"):
    """The ExportedProgram of ``source``'s export variant (dynamic sequence length; for encoders dynamic
    batch too). CoreML decoders: the core model with its static cache, one token per call (the delegate
    keeps the cache as CoreML state; the runner prefills token by token). Non-strict: the module is our
    own code, so Dynamo's bytecode tracing and guards (most of a strict export's time) would check nothing,
    and the graph is the same."""
    from torch.export import Dim

    model = to_torchao(structural_copy(source.model))
    if source.architecture == "llama" and backend == "coreml":
        model.setup_cache(1, max_seq_len)
        module = model.eval()
        example = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
        dynamic_shapes = None
    elif source.architecture == "llama":
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)

        module = ExportDecoder(model, max_seq_len).eval()
        seq_len = Dim("seq_len", min=1, max=max_seq_len)
        example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
        dynamic_shapes = ({1: seq_len}, {0: seq_len})
    elif source.architecture == "bert":
        module = model.eval()
        batch = Dim("batch_size", min=1, max=ENCODER_MAX_BATCH)
        seq_len = Dim("sequence_length", min=1, max=max_seq_len)
        example = tuple(torch.ones(2, 4, dtype=torch.long) for _ in range(3))
        dynamic_shapes = tuple({0: batch, 1: seq_len} for _ in range(3))
    else:
        raise UnsupportedError(f"architecture {source.architecture!r} has no ExecuTorch export (supported: llama, bert)")
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)


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


def lower(program, *, backend: str, metadata: dict | None = None, phase: Callable[[str, str], None] = no_phase):
    """The ExecuTorch program (``.buffer`` is the .pte) with the backend's partitions delegated; ``phase``
    hears when the emit step starts."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(program, partitioner=[partitioner(backend)],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                       constant_methods=metadata)
    phase("emit", "to_executorch: memory planning, ExecuTorch program")
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # dequantize + embedding -> quantized_decomposed.embedding_byte/4bit
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))  # plan dynamic shapes at their upper bounds


def check_backend(backend: str) -> None:
    """Refuse a backend edgeforge cannot lower to (cheap: before any slow step)."""
    if backend not in BACKENDS:
        raise UnsupportedError(f"backend {backend!r} has no ExecuTorch lowering in edgeforge "
                               f"(supported: {', '.join(BACKENDS)})")


def partitioner(backend: str):
    """The ExecuTorch partitioner of ``backend``: XNNPACK, or CoreML (fp16 ML program, iOS 18+ for the KV cache
    as CoreML state; lowered here by coremltools, compiled and run on Apple devices only)."""
    check_backend(backend)
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    import coremltools
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=coremltools.target.iOS18,
                                                 compute_precision=coremltools.precision.FLOAT16)
    return CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)


def delegation_report(program) -> dict:
    """What runs where in the final program: kernels inside the delegate(s), kernels outside (name -> count),
    and the share of parameter bytes the delegate holds."""
    graph_module = program.graph_module
    delegated, outside = 0, Counter()
    delegated_bytes = 0
    for node in graph_module.graph.nodes:
        name = kernel_name(node)
        if name == "executorch_call_delegate":
            inner = getattr(graph_module, node.args[0].target).original_module
            delegated += sum(1 for n in inner.graph.nodes if kernel_name(n))
            delegated_bytes += _parameter_bytes(inner)
        elif name:
            outside[name] += 1
    total_bytes = delegated_bytes + _parameter_bytes(program)
    return {"delegated_ops": delegated, "total_ops": delegated + sum(outside.values()),
            "ops_outside_delegate": dict(sorted(outside.items())),
            "delegated_parameter_share": round(delegated_bytes / total_bytes, 4) if total_bytes else 0.0}


def kernel_name(node) -> str | None:
    """``namespace::op.overload`` of a node that runs a kernel; None for bookkeeping (allocations,
    tuple access, symbolic-size arithmetic and its runtime asserts)."""
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        name = getattr(node.target, "__name__", str(node.target))
        return name if name == "executorch_call_delegate" else None
    name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
    return None if name.split("::")[-1].split(".")[0] in _BOOKKEEPING_OPS else name


def _parameter_bytes(program) -> int:
    """Bytes of a program's parameters (weights, their integers and scales; not caches or RoPE tables)."""
    tensors = program.state_dict
    return sum(tensors[name].numel() * tensors[name].element_size()
               for name in program.graph_signature.inputs_to_parameters.values() if name in tensors)


# ---- the exporter and its sessions ----

@register_exporter
class ExecuTorchExporter:
    """``pte``: ExecuTorch program with the target's delegate (XNNPACK), plus the LLM runner's metadata."""

    name = "pte"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int,
               phase: Callable[[str, str], None] = no_phase) -> dict:
        from importlib.metadata import version

        check_backend(target.backend)
        phase("trace", "torch.export")
        program = export_program(source, max_seq_len=max_seq_len, backend=target.backend)
        metadata = runner_metadata(source, max_seq_len=max_seq_len, dynamic_shape=target.backend != "coreml") \
            if source.architecture == "llama" else None
        phase("lower", f"to_edge_transform_and_lower, {target.backend} partitions")
        executorch_program = lower(program, backend=target.backend, metadata=metadata, phase=phase)
        phase("serialize", MODEL_FILE)
        (out_dir / MODEL_FILE).write_bytes(executorch_program.buffer)
        planned = executorch_program.executorch_program.execution_plan[0].non_const_buffer_sizes
        report = {"model_file": MODEL_FILE, **delegation_report(executorch_program.exported_program()),
                  "planned_memory_bytes": sum(planned),  # activations and KV cache, at the shapes' upper bounds
                  "runner_metadata": metadata, "runner_tokenizer": _runner_tokenizer(source),
                  "versions": {"executorch": version("executorch"), "torchao": version("torchao")}}
        tolerance = guard_tolerance(source)
        if tolerance:
            report["guard_tolerance"] = tolerance
        return report

    def open(self, artifact_dir: Path, manifest: dict):
        model_file = Path(artifact_dir) / manifest["report"]["model_file"]
        if manifest["architecture"] == "bert":
            return EncoderSession(model_file, max_seq_len=manifest["max_seq_len"])
        return DecoderSession(model_file, max_seq_len=manifest["max_seq_len"])


def _runner_tokenizer(source) -> str | None:
    """The tokenizer file (copied beside the .pte by export()) to hand ExecuTorch's LLM runner, which reads
    tokenizer.json, SentencePiece .model, tiktoken and llama2.c .bin files; None without one."""
    if source.architecture != "llama" or not source.tokenizer_files:
        return None
    return source.tokenizer_files[0].name


def guard_tolerance(source) -> dict | None:
    """The guard tolerance, with its reason, where XNNPACK's results differ from the eager model's for a
    reason the eager model cannot follow; None when the scheme's own tolerance applies.

    The eager model computes with XNNPACK's numerics (per-token int8 activations as qd8 rounds them, bf16
    group-wise scales), so every quantized linear matches XNNPACK to float32 summation order. What remains:
    encoders with int8 activations, where a last-bit float difference upstream (LayerNorm, softmax
    kernels) can move a value across an int8 rounding step, and BERT's outlier channels make one step
    large (cosine ~0.9991 on MiniLM 8da8w).
    """
    from edgeforge.quantize.modules import QuantizedLinear
    from edgeforge.quantize.scheme import ActivationScheme

    dynamic = any(isinstance(m, QuantizedLinear) and m.activations is ActivationScheme.DYNAMIC_INT8
                  for m in source.model.modules())
    if source.architecture != "bert" or not dynamic:
        return None
    return {"min_cosine": ENCODER_INT8_TOLERANCE[0], "min_top1": ENCODER_INT8_TOLERANCE[1],
            "reason": "float differences upstream of int8 activation rounding change a few rounded values "
                      "in the encoder, each by one int8 step"}


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
