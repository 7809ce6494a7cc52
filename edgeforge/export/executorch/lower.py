"""ExportedProgram -> ExecuTorch program: the backend's partitioner (XNNPACK, or CoreML for ios-coreml),
memory planning, and what ran where (the delegation report).

For the CoreML backend the decoder is the core model with its static cache, one token per call, lowered
whole to one CoreML program; it runs on Apple devices only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from edgeforge.errors import UnsupportedError
from edgeforge.export.artifact import no_phase

BACKENDS = ("xnnpack", "coreml")  # partitioners edgeforge lowers to

_BOOKKEEPING_OPS = {"sym_size", "_local_scalar_dense", "_assert_scalar", "sym_constrain_range_for_size"}


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
    """Bytes of the constants a program holds: parameters, lifted constants and buffers that are never written
    (quantized weights are buffers or constants, not parameters); the KV caches, which it writes, are left out."""
    signature = program.graph_signature
    written = set(signature.buffers_to_mutate.values())
    names = [*signature.inputs_to_parameters.values(), *signature.inputs_to_lifted_tensor_constants.values(),
             *(name for name in signature.inputs_to_buffers.values() if name not in written)]
    tensors = [program.state_dict.get(name, program.constants.get(name)) for name in names]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)
