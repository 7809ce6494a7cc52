"""The BERT sentence encoder as an architecture: its layer plan and its block-by-block walk (see architecture.py).

A post-norm encoder layer's groups are (query/key/value, attention output, intermediate, output). A LayerNorm's
output feeds the residual stream as well as the next linears, so per-channel scales cannot be folded into it
exactly: every group keeps 1/s as an explicit multiply on its input (one cheap op). Calibration windows are
token windows with every position attended (no padding).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeforge.models.architecture import ENCODER, Absorb, Block, Group, captured_input, load_block
from edgeforge.models.encoder import BertEncoder, Embeddings, EncoderLayer

GROUPS = (Group(("attention.self.query", "attention.self.key", "attention.self.value"), None, Absorb.MULTIPLIER),
          Group(("attention.output.dense",), None, Absorb.MULTIPLIER),
          Group(("intermediate.dense",), None, Absorb.MULTIPLIER),
          Group(("output.dense",), None, Absorb.MULTIPLIER))
# With int8 activations the eager model rounds activations as the runtime does, but a last-bit float difference
# upstream of an int8 rounding (the runtime's fused LayerNorm and softmax kernels against eager torch) now and
# then moves a value across a rounding boundary, and BERT's outlier channels make one step large: cosine ~0.9991
# on MiniLM 8da8w, in XNNPACK and onnxruntime alike. A wrong lowering (XNNPACK's int8 weight-only linear dropping
# the scale, swapped nibbles, wrong scales) lands far below (cosine -0.3 to 0.004). Sentence embeddings have no top-1.
QUANTIZED_ACTIVATION_TOLERANCE = {
    "min_cosine": 0.995, "min_top1": 0.0,
    "reason": "float differences upstream of int8 activation rounding (fused kernels against eager torch) change "
              "a few rounded values in the encoder, each by one int8 step"}


class BertSentenceEncoder:
    name = "bert"
    embedding = "embeddings.word_embeddings"
    model_class = BertEncoder
    family = ENCODER
    generates_text = False
    gates = ("min_cosine",)
    genai_model_type = None
    quantized_activation_tolerance = QUANTIZED_ACTIVATION_TOLERANCE

    def quantized_config(self, config):
        return config

    def layer_widths(self, config) -> dict[str, int]:
        widths = {"attention.output.dense": config.dim, "intermediate.dense": config.dim,
                  "output.dense": config.hidden_dim}
        return {f"encoder.layer.{index}.{short}": widths.get(short, config.dim)
                for index in range(config.n_layers) for group in GROUPS for short in group.linears}

    def forward_inputs(self, tokens: torch.Tensor) -> tuple:
        return tokens, torch.ones_like(tokens)

    def walk(self, checkpoint, seq_len: int) -> _BertWalk:
        return _BertWalk(checkpoint)


class _BertWalk:
    def __init__(self, checkpoint):
        self.checkpoint, self.config = checkpoint, checkpoint.config
        with torch.device("meta"):
            embeddings = Embeddings(self.config)
        self.embeddings = load_block(embeddings, checkpoint.tensors, "embeddings.")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embeddings(tokens, torch.zeros_like(tokens))

    def prologue(self) -> dict[str, torch.Tensor]:
        return {f"embeddings.{name}": tensor for name, tensor in self.embeddings.state_dict().items()
                if not name.startswith("word_embeddings.")}

    def blocks(self):
        for index in range(self.config.n_layers):
            with torch.device("meta"):
                layer = EncoderLayer(self.config)
            load_block(layer, self.checkpoint.tensors, f"encoder.layer.{index}.")
            forward = None if index == self.config.n_layers - 1 else lambda x, memo, b=layer: b(x, _mask(x))
            yield Block(f"encoder.layer.{index}", f"encoder.layer.{index}.", layer, GROUPS,
                        lambda stage, x, memo, b=layer: _group_input(b, stage, x), forward)


def _mask(x: torch.Tensor) -> torch.Tensor:
    """Every key attended: calibration windows have no padding."""
    return torch.ones(x.shape[0], 1, 1, x.shape[1], dtype=torch.bool)


def _group_input(layer: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
    if stage == 0:
        return x
    attention = layer.attention
    if stage == 1:
        return captured_input(attention.output.dense, lambda: attention(x, _mask(x)))
    h = attention(x, _mask(x))
    return h if stage == 2 else layer.intermediate(h)
