"""A Hugging Face ``tokenizer.json`` for a tokenizer that is not one already, for the runtimes that read only
that file (onnxruntime-genai). Checkpoints that carry a SentencePiece ``.model`` (llama2.c, Meta) or a scored
vocabulary (llama2.c ``tok*.bin``, GGUF "llama") get a byte-fallback BPE whose merges are ranked by the
SentencePiece score of the merged piece, which is how SentencePiece's BPE encoder picks merges; tokenizers
built in memory (tiktoken ranks, GGUF byte-level vocabularies) are saved as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeforge.checkpoints.tokenizers import HFTokenizer

SPIECE_SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # SentencePiece piece types


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
