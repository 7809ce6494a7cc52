"""ONNX export: layers (graph builder, quantized linears as MatMulNBits / QDQ), graph (the decoder's and the
encoder's graphs), lower (model.onnx, op report, genai_config.json), session (onnxruntime sessions), exporter
(the ``onnx`` exporter, registered through the ``edgeforge.exporters`` entry point)."""
