"""edgeforge: quantize Llama and sentence-embedding checkpoints, export them for devices, and
measure what the exported artifact really does."""

__version__ = "0.1.0"
