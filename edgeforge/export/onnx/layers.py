"""Building blocks of the ONNX graphs: a small graph builder, and the lowering of linears and embeddings
from edgeforge's eager modules (``nn.Linear``, ``QuantizedLinear``, ``nn.Embedding``, ``QuantizedEmbedding``).

The integers and scales of a quantized layer are written as they are in the quantized checkpoint,
never re-quantized:

- weight-only and dynamic-activation layers become ``com.microsoft::MatMulNBits`` (bits 4 or 8).
  Its B is the offset-binary layout of :mod:`edgeforge.quantize.scheme` (``q + 8`` two per byte, even
  column in the low nibble; ``q + 128`` for 8 bits), [N, blocks, block_size * bits / 8]; its scales
  are ours [N, blocks]. A per-channel layer (one scale per row) is written in blocks of a size the CPU
  kernel takes (16..256, see :func:`nbits_block_size`) with its row scale repeated in every block, which
  is the same matrix. ``accuracy_level=4`` (int8 activations, blockwise symmetric: the eager model's
  ``mlas-int8-block`` numerics) for dynamic int8 activations, the default (float activations) for weight-only.
- static int8 activations become a QDQ pair with the calibrated scale and zero point in front of
  ``MatMul``, whose int8 weight goes through a per-channel ``DequantizeLinear`` (axis 1 of Wᵀ):
  the form NPU execution providers (QNN) turn into integer kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeforge.errors import UnsupportedError
from edgeforge.quantize.activations import MLAS_BLOCK_SIZES, matmul_nbits_block
from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear
from edgeforge.quantize.scheme import ActivationScheme, QuantizedWeight, pack_int4

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 is the IR of opset 21
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_ALIGNMENT = 4096
FLOAT_MIN = float(np.finfo(np.float32).min)  # additive mask: finite, so a fully masked row cannot give NaN


class GraphBuilder:
    """Nodes, initializers and graph inputs/outputs, with unique names and cached constants."""

    def __init__(self, name: str):
        self.name = name
        self.nodes, self.inputs, self.outputs = [], [], []
        self.arrays: dict[str, np.ndarray] = {}  # initializers, turned into TensorProtos only when saved
        self._used: set[str] = set()
        self._constants: dict[tuple, str] = {}
        self.float_weights: dict[int, str] = {}  # data_ptr of a float [rows, cols] weight -> its initializer

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self._used:
            candidate, index = f"{name}_{index}", index + 1
        self._used.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.arrays[name] = np.ascontiguousarray(array)
        return name

    @property
    def tensor_bytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def constant(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that uses the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.initializer(f"const_{len(self._constants)}", array)
        return self._constants[key]

    def op(self, op_type: str, inputs: list[str], *, name: str, outputs: int = 1, domain: str = "",
           **attributes) -> str | list[str]:
        """Add a node; return its output name (a list when ``outputs`` > 1)."""
        from onnx import helper

        node_name = self.unique(f"{name}/{op_type}")
        output_names = [self.unique(f"{node_name}_out{i}" if outputs > 1 else f"{node_name}_out")
                        for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, output_names, name=node_name, domain=domain or None,
                                           **attributes))
        return output_names if outputs > 1 else output_names[0]

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        from onnx import helper

        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, source: str, name: str, elem_type: int, shape: list) -> None:
        """Expose ``source`` as the graph output ``name``: the node computing it writes ``name`` directly (an
        Identity would copy it on every run: the whole KV cache, for present key/values)."""
        from onnx import helper

        self._used.add(name)
        produced = any(source in node.output for node in self.nodes)
        if produced and source not in {o.name for o in self.outputs}:
            for node in self.nodes:
                for field in (node.input, node.output):
                    for index, tensor in enumerate(field):
                        if tensor == source:
                            field[index] = name
        else:  # a graph input, or a tensor already exposed under another name
            self.nodes.append(helper.make_node("Identity", [source], [name], name=f"{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, *, producer: str, metadata: dict[str, str], external_data: Path | None = None,
              external_min_bytes: int = 1024):
        """The ModelProto. With ``external_data``, tensors of at least ``external_min_bytes`` are written
        to that file (each at a 4 KiB-aligned offset, so onnxruntime can map it) and only referenced from
        the proto: no single protobuf message ever holds them, so neither the 2 GiB message limit nor a
        tensor over 2 GiB (an fp32 embedding of an 8B model) is a problem."""
        from onnx import helper

        initializers = self._tensors(external_data, external_min_bytes)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  ir_version=IR_VERSION, producer_name=producer)
        helper.set_model_props(model, metadata)
        return model

    def _tensors(self, external_data: Path | None, external_min_bytes: int) -> list:
        from onnx import TensorProto, helper, numpy_helper

        if external_data is None:
            return [numpy_helper.from_array(array, name) for name, array in self.arrays.items()]
        tensors, offset = [], 0
        with open(external_data, "wb") as handle:
            for name, array in self.arrays.items():
                if array.nbytes < external_min_bytes:
                    tensors.append(numpy_helper.from_array(array, name))
                    continue
                padding = -offset % EXTERNAL_DATA_ALIGNMENT
                handle.write(b"\0" * padding)
                offset += padding
                handle.write(memoryview(array).cast("B"))
                tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                     dims=array.shape)
                for key, value in (("location", external_data.name), ("offset", offset), ("length", array.nbytes)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                tensor.data_location = TensorProto.EXTERNAL
                tensors.append(tensor)
                offset += array.nbytes
        return tensors


def numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


# ---- linears --------------------------------------------------------------------------------------------

def linear(g: GraphBuilder, x: str, module: nn.Module, name: str) -> str:
    """``module(x)`` for x [..., in] -> [..., out]."""
    lower = _LINEARS.get(type(module))
    if lower is None:
        raise UnsupportedError(f"{name}: no ONNX lowering for {type(module).__name__} "
                               f"(supported: {', '.join(t.__name__ for t in _LINEARS)})")
    multiplier = getattr(module, "input_multiplier", None)
    if multiplier is not None:  # SmoothQuant's 1/s, applied before the activations are quantized
        x = g.op("Mul", [x, g.initializer(f"{name}.input_multiplier", numpy(multiplier.float()))], name=name)
    y = lower(g, x, module, name)
    bias = getattr(module, "bias", None)
    if bias is not None:
        y = g.op("Add", [y, g.initializer(f"{name}.bias", numpy(bias.float()))], name=name)
    return y


def _float_linear(g: GraphBuilder, x: str, module: nn.Linear, name: str) -> str:
    shared = g.float_weights.get(module.weight.data_ptr())
    if shared is not None:  # a head tied to the embedding: one initializer, transposed when the session loads
        weight = g.op("Transpose", [shared], name=f"{name}/weight", perm=[1, 0])
    else:
        weight = g.initializer(f"{name}.weight_t", numpy(module.weight.float().t()))  # [in, out]
    return g.op("MatMul", [x, weight], name=name)


def _quantized_linear(g: GraphBuilder, x: str, module: QuantizedLinear, name: str) -> str:
    if module.activations is ActivationScheme.STATIC_INT8:
        return _qdq_linear(g, x, module, name)
    accuracy_level = 4 if module.activations is ActivationScheme.DYNAMIC_INT8 else 0
    return matmul_nbits(g, x, module, name, accuracy_level=accuracy_level)


_LINEARS = {nn.Linear: _float_linear, QuantizedLinear: _quantized_linear}


def linears_on_one_input(g: GraphBuilder, x: str, modules: list[nn.Module], name: str) -> list[str]:
    """``[m(x) for m in modules]`` as one matmul split along its outputs where the layers can be stacked (same
    type and scheme, no static or smoothing input parameters): one weight read and, with int8 activations,
    one quantization of x instead of one per layer. Otherwise one matmul each."""
    stacked = stacked_linear(g, x, modules, name)
    if stacked is None:
        return [linear(g, x, module, f"{name}.{index}") for index, module in enumerate(modules)]
    sizes = [module.weight.shape[0] if isinstance(module, nn.Linear) else module.qdata.shape[0] for module in modules]
    return g.op("Split", [stacked, g.constant(sizes)], name=name, outputs=len(modules), axis=-1)


def stacked_linear(g: GraphBuilder, x: str, modules: list[nn.Module], name: str) -> str | None:
    """``cat([m(x) for m in modules], -1)`` as one matmul, or None where the layers cannot be stacked."""
    stacked = _stack_rows(modules)
    return None if stacked is None else linear(g, x, stacked, name)


def _stack_rows(modules: list[nn.Module]) -> nn.Module | None:
    first = modules[0]
    if any(type(m) is not type(first) for m in modules) or any(getattr(m, "bias", None) is not None for m in modules):
        return None
    if isinstance(first, nn.Linear):
        stacked = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=False)
        stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in modules]), requires_grad=False)
        return stacked
    if not isinstance(first, QuantizedLinear) or first.activations is ActivationScheme.STATIC_INT8 or any(
            m.scheme != first.scheme or m.activations != first.activations or m.input_multiplier is not None
            for m in modules):  # same scheme and input width: same scale layout
        return None
    zero_points = None if first.zero_point is None else torch.cat([m.zero_point for m in modules])
    weight = QuantizedWeight(torch.cat([m.qdata for m in modules]), torch.cat([m.scale for m in modules]), zero_points)
    return QuantizedLinear(weight, first.scheme, first.activations)


def nbits_block_size(module: QuantizedLinear, name: str, *, accuracy_level: int) -> int:
    """MatMulNBits' block_size for a layer: its group size, or for per-channel scales
    :func:`~edgeforge.quantize.activations.matmul_nbits_block` (int8 activations with accuracy_level 4)."""
    in_features, groups = module.qdata.shape[1], module.scale.shape[1]
    if groups > 1:
        group_size = in_features // groups
        if group_size not in MLAS_BLOCK_SIZES:
            raise UnsupportedError(f"{name}: group size {group_size} cannot be lowered to MatMulNBits, whose "
                                   f"block size must be one of {', '.join(map(str, MLAS_BLOCK_SIZES))}")
        return group_size
    return matmul_nbits_block(in_features, module.scheme, dynamic=accuracy_level == 4)


def nbits_tensors(module: QuantizedLinear, block_size: int) -> dict[str, np.ndarray]:
    """MatMulNBits' B [N, blocks, block_size * bits / 8] uint8, scales [N, blocks] float32 and, for
    asymmetric weights, zero_points [N, ceil(blocks * bits / 8)] uint8, from the layer's buffers."""
    bits = module.scheme.bits
    out_features, in_features = module.qdata.shape
    blocks = -(-in_features // block_size)
    repeat = blocks if module.scale.shape[1] == 1 else 1  # per channel: the row scale in every block
    padded = torch.zeros(out_features, blocks * block_size, dtype=torch.int8)  # padding columns hold q = 0
    padded[:, :in_features] = module.qdata
    if bits == 4:
        packed = pack_int4(padded)
    else:
        packed = (padded.to(torch.int16) + 128).to(torch.uint8)
    tensors = {"B": numpy(packed).reshape(out_features, blocks, -1),
               "scales": numpy(module.scale.float().repeat(1, repeat))}
    if module.zero_point is not None:
        offset = module.zero_point.to(torch.int16).repeat(1, repeat) + (1 << (bits - 1))  # offset binary
        if bits == 4:
            if blocks % 2:  # each row's zero points are padded to whole bytes
                offset = torch.cat([offset, torch.full((out_features, 1), 8, dtype=torch.int16)], dim=1)
            offset = offset[:, 0::2] | (offset[:, 1::2] << 4)
        tensors["zero_points"] = numpy(offset.to(torch.uint8))
    return tensors


def matmul_nbits(g: GraphBuilder, x: str, module: QuantizedLinear, name: str, *, accuracy_level: int) -> str:
    out_features, in_features = module.qdata.shape
    block_size = nbits_block_size(module, name, accuracy_level=accuracy_level)
    tensors = nbits_tensors(module, block_size)
    inputs = [x, g.initializer(f"{name}.qweight", tensors["B"]), g.initializer(f"{name}.scales", tensors["scales"])]
    if "zero_points" in tensors:
        inputs.append(g.initializer(f"{name}.zero_points", tensors["zero_points"]))
    return g.op("MatMulNBits", inputs, name=name, domain=MS_DOMAIN, K=in_features, N=out_features,
                bits=module.scheme.bits, block_size=block_size, accuracy_level=accuracy_level)


def _qdq_linear(g: GraphBuilder, x: str, module: QuantizedLinear, name: str) -> str:
    if module.scale.shape[1] != 1:
        raise UnsupportedError(f"{name}: static int8 activations with grouped weights (group size "
                               f"{module.scheme.group_size}) have no QDQ form here; use per-channel weights")
    if module.scheme.bits != 8:
        raise UnsupportedError(f"{name}: static activations with int{module.scheme.bits} weights; the QDQ "
                               "lowering takes int8 weights (recipe w8a8-static)")
    x_dq = quantize_dequantize(g, x, module.input_scale, module.input_zero_point, name)
    zero_point = module.zero_point
    if zero_point is None:  # symmetric: an explicit int8 zero point fixes DequantizeLinear's input type
        zero_point = torch.zeros_like(module.scale, dtype=torch.int8)
    weight = g.op("DequantizeLinear", [g.initializer(f"{name}.qweight_t", numpy(module.qdata.t())),
                                       g.initializer(f"{name}.scale", numpy(module.scale.float().reshape(-1))),
                                       g.initializer(f"{name}.zero_point", numpy(zero_point.reshape(-1)))],
                  name=f"{name}/weight", axis=1)
    return g.op("MatMul", [x_dq, weight], name=name)


def quantize_dequantize(g: GraphBuilder, x: str, scale: torch.Tensor, zero_point: torch.Tensor, name: str) -> str:
    """QuantizeLinear -> DequantizeLinear with per-tensor int8 qparams. One QuantizeLinear per (tensor,
    qparams), shared by the linears reading it (wq/wk/wv, w1/w3); a DequantizeLinear per consumer, the
    QDQ form onnxruntime's quantizer writes and its QDQ fusions expect."""
    scale_value, zero_value = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
    scale_name = g.constant(np.float32(scale_value), np.float32)
    zero_name = g.constant(np.int8(zero_value), np.int8)
    key = ("quantized", x, scale_value, zero_value)
    if key not in g._constants:
        g._constants[key] = g.op("QuantizeLinear", [x, scale_name, zero_name], name=f"{name}/input")
    return g.op("DequantizeLinear", [g._constants[key], scale_name, zero_name], name=f"{name}/input")


# ---- embeddings -----------------------------------------------------------------------------------------

def embedding(g: GraphBuilder, ids: str, module: nn.Module, name: str) -> str:
    """``module(ids)``: float rows, or int8 rows dequantized after the Gather (only looked-up rows)."""
    if type(module) is nn.Embedding:
        table = g.initializer(f"{name}.weight", numpy(module.weight.float()))
        g.float_weights[module.weight.data_ptr()] = table
        return g.op("Gather", [table, ids], name=name)
    if type(module) is not QuantizedEmbedding:
        raise UnsupportedError(f"{name}: no ONNX lowering for {type(module).__name__} "
                               "(supported: Embedding, QuantizedEmbedding)")
    dim = module.qdata.shape[1]
    groups = module.scale.shape[1]
    values = g.op("Gather", [g.initializer(f"{name}.qdata", numpy(module.qdata)), ids], name=name)
    values = g.op("Cast", [values], name=name, to=1)  # FLOAT
    if module.zero_point is not None:
        zero = g.op("Gather", [g.initializer(f"{name}.zero_point", numpy(module.zero_point)), ids], name=f"{name}/zp")
        zero = g.op("Cast", [zero], name=f"{name}/zp", to=1)
        values = _grouped(g, values, zero, "Sub", groups, dim, name)
    scale = g.op("Gather", [g.initializer(f"{name}.scale", numpy(module.scale.float())), ids], name=f"{name}/scale")
    return _grouped(g, values, scale, "Mul", groups, dim, name)


def _grouped(g: GraphBuilder, values: str, qparam: str, op_type: str, groups: int, dim: int, name: str) -> str:
    """values [..., dim] (op) qparam [..., groups], each qparam applying to dim // groups columns."""
    if groups == 1:
        return g.op(op_type, [values, qparam], name=name)
    shape = g.op("Shape", [values], name=name)
    grouped = g.op("Reshape", [values, g.constant([-1, groups, dim // groups])], name=name)
    qparam = g.op("Reshape", [qparam, g.constant([-1, groups, 1])], name=name)
    return g.op("Reshape", [g.op(op_type, [grouped, qparam], name=name), shape], name=name)
