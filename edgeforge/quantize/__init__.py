"""Quantization: scheme math and int4 packing (`scheme`), activation fake-quant (`activations`),
the calibration algorithms (`rtn`, `gptq`, `awq`, `smoothquant`) and error metrics (`metrics`).

The modules here are pure tensor math: no model loading and no file I/O.
"""
