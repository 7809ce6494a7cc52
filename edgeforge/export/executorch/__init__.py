"""ExecuTorch export: graph (the export variant, :mod:`.layers` its quantized layers in lowerable ops),
lower (XNNPACK/CoreML lowering to a .pte), session (the .pte in executorch.runtime), exporter (the ``pte``
exporter, registered through the ``edgeforge.exporters`` entry point)."""
