"""The Llama decoder as an architecture: its layer plan and its block-by-block walk (see architecture.py).

In a block the four groups of linears sharing an input are (qkv, wo, gate/up, down); their inputs come from
``attention_norm``, the attention context (wv's rows, when no grouped-query attention shares them), ``ffn_norm``
and ``silu(w1 z) * (w3 z)`` (linear in w3's rows). After the blocks the final norm feeds the output head, a
separate copy even when the source ties it to the embedding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.models.architecture import (DECODER, Absorb, Block, Group, RotationPlan, captured_input,
                                           load_block)
from edgeforge.models.llama import RMSNorm, Transformer, TransformerBlock, rope_tables

HEAD = (Group(("output",), "norm", Absorb.NORM),)


class LlamaDecoder:
    name = "llama"
    embedding = "tok_embeddings"
    model_class = Transformer
    family = DECODER
    generates_text = True
    gates = ("max_kld", "min_top1", "max_ppl_ratio")
    genai_model_type = "llama"
    # Every quantized linear matches the runtime's numerics to float32 summation order, and where chaos over
    # many layers still moves top tokens the guard's second tier judges the artifact's drift from fp32 instead.
    quantized_activation_tolerance = None

    def quantized_config(self, config):
        """A quantized copy stores its own output head (never tied to the embedding)."""
        return replace(config, tie_embeddings=False)

    def groups(self, config) -> tuple[Group, ...]:
        value_rows = Absorb.ROWS if config.n_heads == config.n_kv_heads else Absorb.NONE
        return (Group(("attention.wq", "attention.wk", "attention.wv"), "attention_norm", Absorb.NORM),
                Group(("attention.wo",), "attention.wv", value_rows),
                Group(("feed_forward.w1", "feed_forward.w3"), "ffn_norm", Absorb.NORM),
                Group(("feed_forward.w2",), "feed_forward.w3", Absorb.ROWS))

    def layer_widths(self, config) -> dict[str, int]:
        widths = {"attention.wq": config.dim, "attention.wk": config.dim, "attention.wv": config.dim,
                  "attention.wo": config.n_heads * config.head_dim, "feed_forward.w1": config.dim,
                  "feed_forward.w3": config.dim, "feed_forward.w2": config.hidden_dim}
        layers = {f"layers.{index}.{short}": widths[short]
                  for index in range(config.n_layers) for group in self.groups(config) for short in group.linears}
        return {**layers, "output": config.dim}

    def forward_inputs(self, tokens: torch.Tensor) -> tuple:
        return (tokens,)

    def rotation_plan(self, config, names) -> RotationPlan:
        readers, writers, heads = {"output.weight": "norm.weight"}, [], []
        for index in range(config.n_layers):
            prefix = f"layers.{index}."
            for short in ("attention.wq", "attention.wk", "attention.wv"):
                readers[f"{prefix}{short}.weight"] = f"{prefix}attention_norm.weight"
            for short in ("feed_forward.w1", "feed_forward.w3"):
                readers[f"{prefix}{short}.weight"] = f"{prefix}ffn_norm.weight"
            writers += [f"{prefix}attention.wo.weight", f"{prefix}feed_forward.w2.weight"]
            heads.append((f"{prefix}attention.wv.weight", f"{prefix}attention.wo.weight"))
        return RotationPlan(width=config.dim, embedding="tok_embeddings.weight", readers=readers,
                            writers=tuple(writers), heads=tuple(heads), head_dim=config.head_dim,
                            queries_per_value=config.n_heads // config.n_kv_heads, head="output.weight",
                            head_source="output.weight" if "output.weight" in names else "tok_embeddings.weight")

    def walk(self, checkpoint, seq_len: int) -> _LlamaWalk:
        return _LlamaWalk(self, checkpoint, seq_len)


class _LlamaWalk:
    def __init__(self, architecture: LlamaDecoder, checkpoint, seq_len: int):
        self.architecture, self.checkpoint, self.config = architecture, checkpoint, checkpoint.config
        self.cos, self.sin = rope_tables(self.config, seq_len)
        self._embedding = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._embedding is None:  # 128k rows: stays in the stored dtype
            self._embedding = self.checkpoint.tensors.stored("tok_embeddings.weight")
        return F.embedding(tokens, self._embedding).float()

    def prologue(self) -> dict[str, torch.Tensor]:
        return {}

    def blocks(self):
        self._embedding = None
        groups = self.architecture.groups(self.config)
        for index in range(self.config.n_layers):
            with torch.device("meta"):
                block = TransformerBlock(self.config)
            load_block(block, self.checkpoint.tensors, f"layers.{index}.")
            yield Block(f"layers.{index}", f"layers.{index}.", block, groups,
                        lambda stage, x, memo, b=block: self._group_input(b, stage, x, memo),
                        lambda x, memo, b=block: self._forward(b, x, memo))
        yield self._head()

    # The memo holds, per calibration batch, what a stage computed that later stages reuse unchanged: the
    # attention context once wq/wk/wv are final (stage 1 on), the residual after attention once wo is (stage 2
    # on). Without it each stage and the block's output would run attention again (3 of its 4 runs, about
    # half of a GPTQ block's time); the values, and so the result, are the same bits.

    def _group_input(self, block: nn.Module, stage: int, x: torch.Tensor, memo: dict) -> torch.Tensor:
        if stage == 0:
            return block.attention_norm(x)
        if stage == 1:
            return self._context(block, x, memo)
        z = block.ffn_norm(self._residual(block, x, memo))
        return z if stage == 2 else F.silu(block.feed_forward.w1(z)) * block.feed_forward.w3(z)

    def _context(self, block: nn.Module, x: torch.Tensor, memo: dict) -> torch.Tensor:
        if "context" not in memo:
            z = block.attention_norm(x)
            memo["context"] = captured_input(block.attention.wo, lambda: block.attention(z, self.cos, self.sin))
        return memo["context"]

    def _residual(self, block: nn.Module, x: torch.Tensor, memo: dict) -> torch.Tensor:
        if "residual" not in memo:
            memo["residual"] = x + block.attention.wo(self._context(block, x, memo))
            del memo["context"]  # only the residual reads it
        return memo["residual"]

    def _forward(self, block: nn.Module, x: torch.Tensor, memo: dict) -> torch.Tensor:
        h = memo.pop("residual", None)
        if h is None:
            return block(x, self.cos, self.sin)
        return h + block.feed_forward(block.ffn_norm(h))

    def _head(self) -> Block:
        tensors = self.checkpoint.tensors
        head = nn.Module()
        head.norm = RMSNorm(self.config.dim, self.config.norm_eps)
        head.norm.weight = nn.Parameter(tensors["norm.weight"], requires_grad=False)
        head.output = nn.Linear(self.config.dim, self.config.vocab_size, bias=False)
        name = "output.weight" if "output.weight" in tensors else "tok_embeddings.weight"
        head.output.weight = nn.Parameter(tensors.stored(name), requires_grad=False)
        return Block("head", "", head, HEAD, lambda stage, x, memo: head.norm(x), None, head=True)
