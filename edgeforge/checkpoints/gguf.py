"""GGUF files (llama.cpp): one memory-mapped file holding metadata, the vocabulary and tensors.

Read with the ``gguf`` package's reader. Only ``general.architecture == "llama"`` is opened.
Tensors are dequantized to float32 on access (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...:
whatever ``gguf.quants.dequantize`` handles); each entry keeps its GGML type name as dtype.
GGUF lists dimensions innermost first (ggml ``ne`` order), so a weight stored as ``[in, out]``
is ``[out, in]`` here. q/k rows are interleaved pairs and are converted to rotate-half on read.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from edgeforge.checkpoints.base import Checkpoint, LazyTensors, checkpoint_format
from edgeforge.checkpoints.permute import interleaved_to_rotate_half
from edgeforge.checkpoints.tokenizers import LLAMA3_SPLIT, HFTokenizer, ScoredBPETokenizer, bos_template
from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.models.llama import LlamaConfig, RopeScaling, rope_inverse_frequencies

_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (gguf.TokenType)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp (src/llama-vocab.cpp) splits text for one ``tokenizer.ggml.pre`` name before BPE: its
    regexes applied one after another to the pieces left by the previous one, then GPT-2's byte mapping."""

    splits: tuple[str, ...]  # regexes, in order; "digits": every \p{N} alone
    ignore_merges: bool = False  # a piece that is a whole token is taken as is (Llama 3, Tekken)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own
_QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_GPT2 = PreTokenizer((_GPT2_SPLIT,))
_STARCODER = PreTokenizer(("digits", _GPT2_SPLIT))  # LLAMA_VOCAB_PRE_TYPE_STARCODER, _SMOLLM, _REFACT, ...
_QWEN2 = PreTokenizer((_QWEN2_SPLIT,))
PRE_TOKENIZERS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_SPLIT,))),
    # "gpt2" is the tokenizer model's name; llama.cpp itself writes (and reads) "gpt-2"
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _STARCODER),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    "tekken": PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    # llama.cpp's fallback, also for files without tokenizer.ggml.pre
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]")),
}


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


class _Metadata:
    """Typed access to a reader's key-value fields, raising InputError naming the file."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:  # undecodable string, wrong value type
            raise InputError(f"cannot read metadata key {key!r} ({exc})", path=self.path) from exc

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise InputError(f"missing metadata key {key!r}", path=self.path)
        return value


def _open_reader(path: Path):
    import gguf

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from exc
    if magic != b"GGUF":
        raise InputError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')", path=path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # short reads surface as numpy reshape/view/index errors deep in the reader
        problem = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"not a readable GGUF file: truncated or corrupt ({path.stat().st_size} bytes; {problem})",
                         path=path) from exc


@checkpoint_format("gguf", detect=_is_gguf)
def open_gguf(path: Path) -> Checkpoint:
    """Open a llama GGUF file (memory-mapped; tensors are dequantized when read)."""
    reader = _open_reader(path)
    meta = _Metadata(reader, path)
    architecture = meta.require("general.architecture")
    if architecture != "llama":
        raise UnsupportedError(f"GGUF architecture {architecture!r} (only llama is read)", path=path)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    _check_types(stored.values(), path)
    config = _config(meta, stored, path)
    tensors = LazyTensors(path)
    for name, tensor in stored.items():
        if name == "rope_freqs.weight":
            continue  # RoPE factors: folded into config.rope_scaling by _config
        core = _core_name(name)
        heads = {"wq": config.n_heads, "wk": config.n_kv_heads}.get(core.split(".")[-2]) \
            if core.startswith("layers.") else None
        tensors.add(core, _shape(tensor), tensor.tensor_type.name, _reader(tensor, heads))
    type_counts = dict(Counter(tensor.tensor_type.name for tensor in stored.values()))
    return Checkpoint(path=path, format="gguf", architecture="llama", config=config, tensors=tensors,
                      tokenizer=_tokenizer(meta, path), files=[path],
                      metadata={"file_type": _file_type_name(meta.get("general.file_type")),
                                "tensor_types": type_counts, "tokenizer_model": meta.get("tokenizer.ggml.model"),
                                "tokenizer_pre": meta.get("tokenizer.ggml.pre")})


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne order -> torch order


def _core_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _NAMES:
        return f"{_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return name  # kept so validation names the unexpected tensor


def _check_types(tensors, path: Path) -> None:
    """UnsupportedError for a GGML type ``gguf.quants.dequantize`` cannot decode (probed on one block)."""
    import gguf

    for qtype in {tensor.tensor_type for tensor in tensors}:
        one_block = np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], dtype=np.uint8)
        try:
            gguf.quants.dequantize(one_block, qtype)
        except NotImplementedError as exc:
            raise UnsupportedError(f"GGML tensor type {qtype.name} cannot be dequantized", path=path) from exc


def _dequantize(tensor) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])  # copy out of the read-only map
    return torch.from_numpy(values.reshape(_shape(tensor)))


def _reader(tensor, rope_heads: int | None):
    def read() -> torch.Tensor:
        weight = _dequantize(tensor)
        return interleaved_to_rotate_half(weight, rope_heads) if rope_heads else weight

    return read


def _file_type_name(value) -> str | int | None:
    import gguf

    try:
        return None if value is None else gguf.LlamaFileType(value).name
    except ValueError:
        return value


def _config(meta: _Metadata, stored: dict, path: Path) -> LlamaConfig:
    heads, kv_heads = meta.require("llama.attention.head_count"), meta.get("llama.attention.head_count_kv")
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise UnsupportedError("per-layer attention head counts", path=path)
    dim = meta.require("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length") or dim // max(heads, 1)
    rope_dims = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedError(f"partial RoPE (rope.dimension_count {rope_dims} of head_dim {head_dim})", path=path)
    if "token_embd.weight" in stored:
        vocab = _shape(stored["token_embd.weight"])[0]
    else:
        vocab = len(meta.get("tokenizer.ggml.tokens") or [])
    try:
        config = LlamaConfig(dim=dim, n_layers=meta.require("llama.block_count"), n_heads=heads,
                             n_kv_heads=kv_heads or heads, vocab_size=vocab, head_dim=head_dim,
                             hidden_dim=meta.require("llama.feed_forward_length"),
                             norm_eps=_decimal(meta.require("llama.attention.layer_norm_rms_epsilon")),
                             rope_theta=_decimal(meta.get("llama.rope.freq_base", 10000.0)),
                             max_seq_len=meta.require("llama.context_length"),
                             tie_embeddings="output.weight" not in stored)
    except ConfigError as exc:
        raise InputError(f"implausible llama metadata: {exc.problem}", path=path) from exc
    return dataclasses.replace(config, rope_scaling=_rope_scaling(meta, stored, config, path))


def _decimal(value) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata, stored: dict, config: LlamaConfig, path: Path) -> RopeScaling | None:
    """Linear scaling from metadata, or Llama-3 scaling reconstructed from ``rope_freqs.weight``.

    llama.cpp stores Llama 3.1+ scaling only as per-frequency divisors of the RoPE frequencies. They
    are accepted when Llama-3 scaling (low/high freq factor 1/4, original context 8192 unless the
    metadata says otherwise) reproduces every divisor; anything else is refused.
    """
    kind = meta.get("llama.rope.scaling.type", "none")
    freqs = stored.get("rope_freqs.weight")
    if kind not in ("none", "linear"):
        raise UnsupportedError(f"RoPE scaling type {kind!r} (supported: linear, llama3)", path=path)
    if kind == "linear":
        if freqs is not None:
            raise UnsupportedError("linear RoPE scaling combined with rope_freqs.weight factors", path=path)
        return RopeScaling("linear", factor=_decimal(meta.require("llama.rope.scaling.factor")))
    if freqs is None:
        return None
    divisors = _dequantize(freqs).double().flatten()
    if torch.all(divisors == 1):
        return None
    candidate = RopeScaling("llama3", factor=_decimal(meta.get("llama.rope.scaling.factor") or divisors.max().item()),
                            original_max_position_embeddings=int(
                                meta.get("llama.rope.scaling.original_context_length", 8192)))
    unscaled = rope_inverse_frequencies(config)
    scaled = rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=candidate))
    if divisors.shape == unscaled.shape and torch.allclose(unscaled / scaled, divisors, rtol=1e-4, atol=0):
        return candidate
    raise UnsupportedError(f"rope_freqs.weight holds per-frequency RoPE factors that Llama-3 scaling (factor "
                           f"{candidate.factor:g}, low/high freq factor 1/4, original context "
                           f"{candidate.original_max_position_embeddings}) does not reproduce; arbitrary factors "
                           f"are not supported", path=path)


def _tokenizer(meta: _Metadata, path: Path):
    """The vocabulary in the metadata as a tokenizer, or None when the file carries none.

    BOS as llama.cpp adds it: ``tokenizer.ggml.add_bos_token``, else on for SentencePiece vocabularies and
    for the pre-tokenizers that set it (Llama 3, Tekken). Generation ends at the eos, eot and eom ids."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    model = meta.require("tokenizer.ggml.model")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(types) != len(tokens) or len(scores) != len(tokens):
        raise InputError(f"tokenizer has {len(tokens)} tokens but {len(scores)} scores and {len(types)} types",
                         path=path)
    ids = {}
    for key in ("bos", "eos", "eot", "eom", "padding"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and not 0 <= value < len(tokens):
            raise InputError(f"tokenizer.ggml.{key}_token_id {value} is outside the {len(tokens)}-token vocabulary",
                             path=path)
        ids[key] = value
    stops = tuple(ids[key] for key in ("eot", "eom") if ids[key] is not None)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if model == "llama":
        if not meta.get("tokenizer.ggml.add_space_prefix", True):
            raise UnsupportedError("SentencePiece vocabulary without the dummy-prefix space", path=path)
        control = {i for i, kind in enumerate(types) if kind == _CONTROL}
        bos, eos = 1 if ids["bos"] is None else ids["bos"], 2 if ids["eos"] is None else ids["eos"]
        return ScoredBPETokenizer(tokens, scores, bos_id=bos, eos_id=eos, space="\u2581", control_ids=control,
                                  add_bos=True if add_bos is None else bool(add_bos), eos_ids=stops,
                                  kind="gguf-llama", source=path, files=[])
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedError(f"byte-level BPE pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})",
                                   path=path)
        rules = PRE_TOKENIZERS[pre]
        add_bos = rules.add_bos if add_bos is None else bool(add_bos)
        if add_bos and ids["bos"] is None:
            raise InputError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set",
                             path=path)
        names = {key: None if value is None else tokens[value] for key, value in ids.items()}
        backend = _byte_level_bpe(meta, tokens, types, rules)
        backend.post_processor = bos_template(backend, names["bos"] if add_bos else None)
        return HFTokenizer(backend, bos_token=names["bos"], eos_token=names["eos"], pad_token=names["padding"],
                           eos_ids=stops, source=path, kind=f"gguf-gpt2 ({pre})", files=[])
    raise UnsupportedError(f"tokenizer model {model!r} (supported: llama, gpt2)", path=path)


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int], rules: PreTokenizer):
    """A ``tokenizers.Tokenizer`` for a GPT-2-style byte-level BPE vocabulary (tokens + merges) split by ``rules``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(merge.split(" ", 1)) for merge in meta.require("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}  # first id wins
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=rules.ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True) if split == "digits" else
             pre_tokenizers.Split(Regex(split), behavior="isolated") for split in rules.splits]
    # the regexes split the raw text; GPT-2's byte mapping comes last
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False) for i, kind in enumerate(types)
                          if kind == _USER_DEFINED])
    return tokenizer
