"""onnxruntime-genai's side of a decoder artifact: ``genai_config.json`` and a Hugging Face ``tokenizer.json``.

genai reads the decoder's input/output names and shapes from the "decoder" section of genai_config.json
(what onnxruntime-genai's own model builder writes for a CPU model: past and present as separate
buffers, ``past_present_share_buffer: false``). Its tokenizer reads ``tokenizer.json``; checkpoints that
carry a SentencePiece ``.model`` (llama2.c, Meta) or a scored vocabulary (llama2.c ``tok*.bin``) get one
converted here: a byte-fallback BPE whose merges are ranked by the SentencePiece score of the merged
piece, which is how SentencePiece's BPE encoder picks merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeforge.checkpoints.tokenizers import HFTokenizer
from edgeforge.export.onnx_llama import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

SPIECE_SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # SentencePiece piece types


def genai_config(config, *, max_seq_len: int, model_file: str, bos_id: int | None, eos_id: int | list[int] | None,
                 pad_id: int | None, share_buffer: bool = False) -> dict:
    """The genai_config.json of a decoder artifact (greedy search by default; ``eos_id`` may list several;
    ``share_buffer``: past and present key/values are one max-length buffer updated in place)."""
    genai = {
        "model": {
            "bos_token_id": bos_id,
            "context_length": max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": config.head_dim,
                "hidden_size": config.dim,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY.replace("{}", "%d"),
                           "past_value_names": PAST_VALUE.replace("{}", "%d")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY.replace("{}", "%d"),
                            "present_value_names": PRESENT_VALUE.replace("{}", "%d")},
                "num_attention_heads": config.n_heads,
                "num_hidden_layers": config.n_layers,
                "num_key_value_heads": config.n_kv_heads,
            },
            "eos_token_id": eos_id,
            "pad_token_id": pad_id if pad_id is not None else (eos_id if isinstance(eos_id, int) else
                                                                 eos_id[0] if eos_id else 0),
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    for key in ("bos_token_id", "eos_token_id"):  # genai refuses null ids: without a tokenizer, leave them out
        if genai["model"][key] is None:
            del genai["model"][key]
    return genai


def write_tokenizer_json(tokenizer, out_dir: Path) -> str | None:
    """Write tokenizer.json + tokenizer_config.json for a tokenizer that is not one already (SentencePiece,
    scored vocabularies, tiktoken ranks, GGUF byte-level vocabularies) with its BOS policy; return None when
    written, else why not (the caller records it in the report)."""
    source = getattr(tokenizer, "source", None)
    if tokenizer is None:
        return "the checkpoint has no tokenizer"
    if isinstance(tokenizer, HFTokenizer):  # built in memory (tiktoken ranks, GGUF byte-level): saved as it is
        tokenizer.save(out_dir)
        return None
    if tokenizer.kind == "sentencepiece":
        spec = _sentencepiece_spec(Path(source))
    elif tokenizer.kind == "llama2c-tok.bin" or hasattr(tokenizer, "pieces"):
        spec = _scored_bpe_spec(tokenizer)
    else:
        return f"no tokenizer.json conversion for a {tokenizer.kind} tokenizer"
    if isinstance(spec, str):
        return spec
    names = dict(enumerate(spec["pieces"]))
    fast = _bpe_tokenizer(**spec, bos=names[tokenizer.bos_id] if tokenizer.add_bos else None)
    fast.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
               "unk_token": names[spec["unk_id"]] if spec["unk_id"] is not None else None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": tokenizer.add_bos,
         "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True}, indent=2) + "\n")
    return None


def _sentencepiece_spec(path: Path) -> dict | str:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        return f"{path.name} is a SentencePiece {kind} model; only BPE is converted to tokenizer.json"
    normalizer = proto.normalizer_spec
    if normalizer.name not in ("identity", "") or normalizer.precompiled_charsmap:
        return f"{path.name} normalises text ({normalizer.name}); only identity normalisation is converted"
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    return {"pieces": pieces, "scores": [p.score for p in proto.pieces],
            "normal": [t == NORMAL for t in types], "special": [t in (CONTROL, UNKNOWN) for t in types],
            "unk_id": types.index(UNKNOWN) if UNKNOWN in types else None,
            "byte_fallback": proto.trainer_spec.byte_fallback,
            "add_dummy_prefix": normalizer.add_dummy_prefix,
            "remove_extra_whitespaces": normalizer.remove_extra_whitespaces}


def _scored_bpe_spec(tokenizer) -> dict:
    """edgeforge's ScoredBPETokenizer (llama2.c tok.bin, GGUF llama vocab): run.c's encoder, no whitespace cleanup."""
    control = set(tokenizer._control)
    bytes_ = set(tokenizer._byte_of)
    names = {0: "<unk>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    pieces = [names.get(i, piece) if i in control else piece.replace(tokenizer.space, SPIECE_SPACE)
              for i, piece in enumerate(tokenizer.pieces)]
    return {"pieces": pieces, "scores": list(tokenizer.scores),
            "normal": [i not in control and i not in bytes_ for i in range(len(pieces))],
            "special": [i in control for i in range(len(pieces))], "unk_id": 0 if 0 in control else None,
            "byte_fallback": bool(bytes_), "add_dummy_prefix": True, "remove_extra_whitespaces": False}


def _bpe_tokenizer(*, pieces, scores, normal, special, unk_id, byte_fallback, add_dummy_prefix,
                   remove_extra_whitespaces, bos: str | None):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {}
    for index, piece in enumerate(pieces):
        vocab.setdefault(piece, index)
    merges = []
    for index, piece in enumerate(pieces):  # every split of a piece into two pieces, ranked by its score
        if not normal[index]:
            continue
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                  if piece[:cut] in vocab and piece[cut:] in vocab]
        merges += [(-scores[index], vocab[left], vocab[right], left, right) for left, right in splits]
    merges.sort()
    tokenizer = Tokenizer(BPE(vocab, [(left, right) for *_, left, right in merges],
                              unk_token=pieces[unk_id] if unk_id is not None else None, fuse_unk=True,
                              byte_fallback=byte_fallback))
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                  for piece, is_special in zip(pieces, special) if is_special])
    steps = []
    if remove_extra_whitespaces:  # SentencePiece: drop spaces (only U+0020) at the ends, collapse runs of them
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", SPIECE_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if bos is not None:  # encode(add_special_tokens=True) puts BOS first, as SentencePiece's users do
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, vocab[bos])])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []))
    return tokenizer
