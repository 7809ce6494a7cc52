"""ExecuTorch exporter: a Llama decoder or a sentence encoder (fp32 or edgeforge-quantized) -> ``model.pte``.

    eager model ──swap──▶ export variant ──torch.export──▶ ExportedProgram ──XNNPACK──▶ model.pte
    (Transformer,         (the same tensors: ExecuTorch's     (strict; dynamic      (to_edge_transform_and_lower,
     BertEncoder)          KV-cache + SDPA ops, XNNPACK-       sequence length)      then to_executorch)
                           shaped norm and RoPE, torchao
                           tensors holding edgeforge's integers)

Quantized layers keep edgeforge's calibrated integers and scales: each becomes a torchao
``IntxUnpackedToInt8Tensor`` built from the checkpoint's ``qdata``/``scale``/``zero_point`` as they
are (nothing is re-quantized). XNNPACK runs linears with dynamic int8 activations as its 8da4w/8da8w
kernels; quantized embeddings become ExecuTorch's ``embedding_byte``/``embedding_4bit`` ops.

The decoder's .pte carries the metadata methods ExecuTorch's LLM runner reads (``get_max_seq_len`` ...),
and export() copies the tokenizer beside it, so the artifact runs unchanged in
``executorch.extension.llm.runner`` as well as through :class:`DecoderSession`.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.errors import InputError, RuntimeFailure, UnsupportedError
from edgeforge.export.artifact import register_exporter

MODEL_FILE = "model.pte"
ENCODER_MAX_BATCH = 64  # largest batch the encoder graph accepts
# Guard tolerance (min cosine, min top-1) where XNNPACK rounds int4 group scales to bf16 (bf16_scale_tolerance):
# the default cosine, and top-1 relaxed for near-ties flipped by a 2^-9 scale change.
BF16_SCALE_TOLERANCE = (0.999, 0.9)
_SKIP_OPS = {"getitem", "sym_size.int", "_local_scalar_dense.default", "_assert_scalar.default", "add", "mul",
             "sub", "ge", "le", "lt", "gt", "eq"}  # bookkeeping nodes, not kernels


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
        # x: [1, S, dim]; cos, sin: [S, head_dim]
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
    """``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]`` over the core's modules."""

    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        core = _structural_copy(model)
        for layer in core.layers:
            layer.attention = SdpaAttention(layer.attention, max_seq_len)
            layer.attention_norm, layer.ffn_norm = XnnpackRMSNorm(layer.attention_norm), XnnpackRMSNorm(layer.ffn_norm)
        core.norm = XnnpackRMSNorm(core.norm)
        self.core, self.max_seq_len = core, max_seq_len
        self.register_buffer("rope_cos", model.rope_cos[:max_seq_len].clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin[:max_seq_len].clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        x = self.core.tok_embeddings(tokens)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.core.layers:
            x = layer(x, cos, sin, start_pos)  # TransformerBlock hands start_pos on to SdpaAttention
        return self.core.output(self.core.norm(x))


def _structural_copy(module: nn.Module) -> nn.Module:
    """New module objects over the same parameter and buffer tensors, so swaps leave the original alone."""
    clone = copy.copy(module)
    clone._modules = {name: _structural_copy(child) for name, child in module._modules.items()}
    clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
    return clone


# ---- edgeforge's quantized modules as torchao tensors XNNPACK lowers ----

def to_torchao(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear/QuantizedEmbedding in ``model`` (in place) by nn.Linear/nn.Embedding
    holding a torchao ``IntxUnpackedToInt8Tensor`` made from the module's own integers and scales."""
    from edgeforge.quantize.scheme import ActivationScheme
    from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear, set_module

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
            set_module(model, name, linear)
        elif isinstance(module, QuantizedEmbedding):
            rows, dim = module.qdata.shape
            embedding = nn.Embedding(rows, dim, device="meta")
            embedding.weight = nn.Parameter(_intx_tensor(module, False), requires_grad=False)
            set_module(model, name, embedding)
    return model


def _intx_tensor(module: nn.Module, dynamic_activations: bool):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    qdata, scale = module.qdata, module.scale
    zero_point = module.zero_point if module.zero_point is not None else torch.zeros(scale.shape, dtype=torch.int8)
    group_size = qdata.shape[1] // scale.shape[1]
    return IntxUnpackedToInt8Tensor(qdata, scale, zero_point, getattr(torch, f"int{module.scheme.bits}"),
                                    (1, group_size), torch.float32,
                                    "int8_asym_per_token" if dynamic_activations else None)


# ---- torch.export -> XNNPACK -> .pte ----

def export_program(source, *, max_seq_len: int):
    """The ExportedProgram of ``source``'s export variant (strict export, dynamic sequence length)."""
    from torch.export import Dim

    model = to_torchao(_structural_copy(source.model))
    if source.architecture == "llama":
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)

        module = ExportDecoder(model, max_seq_len).eval()
        seq_len = Dim("seq_len", min=1, max=max_seq_len)
        example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
        dynamic_shapes = ({1: seq_len}, {0: seq_len})
    elif source.architecture == "bert":
        module = model.eval()
        batch = Dim("batch_size", min=1, max=ENCODER_MAX_BATCH)
        seq_len = Dim("sequence_length", min=1, max=source.config.max_seq_len)
        example = tuple(torch.ones(2, 4, dtype=torch.long) for _ in range(3))
        dynamic_shapes = tuple({0: batch, 1: seq_len} for _ in range(3))
    else:
        raise UnsupportedError(f"architecture {source.architecture!r} has no ExecuTorch export (supported: llama, bert)")
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=True)


def runner_metadata(source, *, max_seq_len: int) -> dict:
    """Constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h)."""
    config, tokenizer = source.config, source.tokenizer
    metadata = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                "get_vocab_size": config.vocab_size, "get_n_layers": config.n_layers, "use_kv_cache": True,
                "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True}
    if tokenizer is not None and tokenizer.bos_id is not None:
        metadata["get_bos_id"] = tokenizer.bos_id
    if tokenizer is not None and tokenizer.eos_id is not None:
        metadata["get_eos_ids"] = [tokenizer.eos_id]
    return metadata


def lower(program, *, backend: str, metadata: dict | None = None):
    """Edge dialect with the backend's partitions delegated, then the ExecuTorch program (``.buffer``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if backend != "xnnpack":
        raise UnsupportedError(f"backend {backend!r} has no ExecuTorch lowering in edgeforge (supported: xnnpack)")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                       constant_methods=metadata)
    report = delegation_report(edge.exported_program())
    executorch_program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    return executorch_program, report


def delegation_report(program) -> dict:
    """Kernels inside and outside the delegate, and the share of parameter elements the delegate holds."""
    graph_module = program.graph_module
    delegated, outside = 0, Counter()
    delegated_elements = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            inner = lowered.original_module
            delegated += sum(1 for n in inner.graph.nodes if n.op == "call_function" and _op_name(n.target) not in _SKIP_OPS)
            delegated_elements += _parameter_elements(inner)
        elif name not in _SKIP_OPS:
            outside[name] += 1
    outside_elements = _parameter_elements(program)
    total = delegated + sum(outside.values())
    return {"delegated_ops": delegated, "total_ops": total, "ops_outside_delegate": dict(sorted(outside.items())),
            "delegated_parameter_share": round(delegated_elements / max(delegated_elements + outside_elements, 1), 4)}


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.removeprefix("aten.")


def _parameter_elements(program) -> int:
    """Elements of the program's weights: parameters and constants, less scales, zero points and buffers."""
    signature = program.graph_signature
    names = list(signature.inputs_to_parameters.values()) + list(signature.inputs_to_lifted_tensor_constants.values())
    tensors = {**program.state_dict, **program.constants}
    return sum(tensors[name].numel() for name in names
               if name in tensors and not name.endswith(("scale", "zero_point")))


# ---- the exporter and its sessions ----

@register_exporter
class ExecuTorchExporter:
    """``pte``: ExecuTorch program with the target's delegate (XNNPACK), plus the LLM runner's metadata."""

    name = "pte"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int) -> dict:
        import executorch
        import torchao

        program = export_program(source, max_seq_len=max_seq_len)
        metadata = runner_metadata(source, max_seq_len=max_seq_len) if source.architecture == "llama" else None
        executorch_program, report = lower(program, backend=target.backend, metadata=metadata)
        (out_dir / MODEL_FILE).write_bytes(executorch_program.buffer)
        version = getattr(executorch, "__version__", None) or _distribution_version("executorch")
        report = {"model_file": MODEL_FILE, **report, "runner_metadata": metadata,
                  "versions": {"executorch": version, "torchao": torchao.__version__}}
        tolerance = bf16_scale_tolerance(source.model)
        if tolerance:
            report["guard_tolerance"] = tolerance
        return report

    def open(self, artifact_dir: Path, manifest: dict):
        model_file = Path(artifact_dir) / manifest["report"]["model_file"]
        if manifest["architecture"] == "bert":
            return EncoderSession(model_file)
        return DecoderSession(model_file, max_seq_len=manifest["max_seq_len"])


def bf16_scale_tolerance(model: nn.Module) -> dict | None:
    """The guard tolerance for group-wise int4 linears whose scales bf16 cannot hold exactly, else None.

    XNNPACK's blockwise 4-bit kernels keep group scales in bf16 (its serializer narrows them), so such
    a layer runs with each scale rounded to 8 significant bits (relative error <= 2^-9). The integers
    are edgeforge's; the logits move slightly (cosine about 0.9999 on stories260K), enough to flip a
    near-tie in top-1. Scales that are already bf16 values make the .pte match the eager model exactly.
    """
    from edgeforge.quantize.modules import QuantizedLinear

    total = inexact = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.scheme.bits == 4 and module.scale.shape[1] > 1:
            total += module.scale.numel()
            inexact += int((module.scale.bfloat16().float() != module.scale).sum())
    if not inexact:
        return None
    return {"min_cosine": BF16_SCALE_TOLERANCE[0], "min_top1": BF16_SCALE_TOLERANCE[1],
            "reason": f"XNNPACK holds group-wise int4 scales in bf16; {inexact} of {total} scales here are not "
                      "bf16 values, so the .pte's logits differ slightly from the eager model's"}


def _distribution_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def register_kernels() -> None:
    """Make the kernels our programs use outside the delegate available to this process's ExecuTorch
    runtime: ``llama::update_cache``/``custom_sdpa`` and ``quantized_decomposed::embedding_*``. The
    quantized library links against the portable runtime, so that is loaded first."""
    from executorch.extension.pybindings import portable_lib  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def load_method(model_file: Path, method: str = "forward"):
    """``method`` of a .pte loaded through ``executorch.runtime`` (imported here: it takes seconds)."""
    register_kernels()
    from executorch.runtime import Runtime

    if not Path(model_file).is_file():
        raise InputError("no such ExecuTorch program", path=model_file)
    try:
        return Runtime.get().load_program(Path(model_file)).load_method(method)
    except RuntimeError as exc:
        raise RuntimeFailure(f"ExecuTorch could not load method {method!r} ({exc})", path=model_file) from exc


class DecoderSession:
    """A decoder .pte in ``executorch.runtime``: ``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]``.

    The KV cache lives in the program; ``input_pos`` must continue the positions already fed
    (start again at 0 to reset). Positions past ``max_seq_len`` are refused.
    """

    def __init__(self, model_file: Path, *, max_seq_len: int):
        self.model_file, self.max_seq_len = Path(model_file), max_seq_len
        self._method = load_method(self.model_file)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        tokens, input_pos = tokens.to(torch.long).contiguous(), input_pos.to(torch.long).contiguous()
        if tokens.dim() != 2 or tokens.shape[0] != 1 or input_pos.shape != (tokens.shape[1],):
            raise InputError(f"expected tokens [1, S] and input_pos [S], got {tuple(tokens.shape)} and "
                             f"{tuple(input_pos.shape)}", path=self.model_file)
        if int(input_pos[-1]) >= self.max_seq_len or int(input_pos[0]) < 0:
            raise InputError(f"positions {int(input_pos[0])}..{int(input_pos[-1])} outside the program's "
                             f"0..{self.max_seq_len - 1}", path=self.model_file)
        return self._execute([tokens, input_pos])

    __call__ = forward

    def _execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        try:
            outputs = self._method.execute(inputs)
        except RuntimeError as exc:
            raise RuntimeFailure(f"ExecuTorch execution failed ({exc})", path=self.model_file) from exc
        return outputs[0].clone()  # the output lives in the program's planned memory, reused by the next call


class EncoderSession(DecoderSession):
    """A sentence-encoder .pte: ``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]``."""

    def __init__(self, model_file: Path):
        self.model_file = Path(model_file)
        self._method = load_method(self.model_file)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        inputs = [t.to(torch.long).contiguous() for t in (input_ids, attention_mask, token_type_ids)]
        if inputs[0].shape[0] > ENCODER_MAX_BATCH:
            return torch.cat([self.embed(*(t[start:start + ENCODER_MAX_BATCH] for t in inputs))
                              for start in range(0, inputs[0].shape[0], ENCODER_MAX_BATCH)])
        return self._execute(inputs)

    def forward(self, tokens, input_pos):
        raise UnsupportedError("an encoder artifact has no decoder forward; use embed()", path=self.model_file)
