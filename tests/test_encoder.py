"""The BERT-style sentence encoder: real all-MiniLM-L6-v2 parity, HF BertModel parity, config errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeforge.checkpoints import load_model, open_checkpoint
from edgeforge.checkpoints.tokenizers import HFTokenizer
from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.models.encoder import BertConfig, embed
from tests.conftest import MINILM



def test_minilm_embeddings_match_sentence_transformers(minilm_dir):
    checkpoint = open_checkpoint(minilm_dir)
    assert checkpoint.architecture == "bert" and checkpoint.config.max_seq_len == 256
    model = load_model(checkpoint)
    sentences = json.loads((MINILM / "reference" / "sentences.json").read_text())
    reference = torch.from_numpy(np.load(MINILM / "reference" / "embeddings_fp32.npy"))
    ours = embed(model, checkpoint.tokenizer, sentences, batch_size=4)  # several batches, each padded differently
    assert ours.shape == reference.shape
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert cosine.min() >= 0.9999, f"min cosine {cosine.min():.6f} (per sentence: {cosine.tolist()})"


def test_encode_batch_pads_truncates_and_adds_cls_sep():
    tokenizer = HFTokenizer.from_dir(MINILM)  # its tokenizer.json pads and truncates to 128 by itself
    assert tokenizer.encode("a man") == [101, 1037, 2158, 102]
    input_ids, attention_mask, token_type_ids = tokenizer.encode_batch(["a man", "a man is eating food."], 5)
    assert input_ids.tolist() == [[101, 1037, 2158, 102, 0], [101, 1037, 2158, 2003, 102]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert token_type_ids.tolist() == [[0] * 5] * 2 and input_ids.dtype == torch.int64
    assert len(tokenizer.encode("a man")) == 4  # encode_batch left no padding or truncation behind


@pytest.fixture
def tiny_bert(tmp_path):
    """A random 2-layer transformers BertModel (with pooler) saved as safetensors, and the model itself."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_encoder_matches_transformers_bert_on_padded_batch(tiny_bert):
    directory, hf_model = tiny_bert
    checkpoint = open_checkpoint(directory)
    assert BertConfig.from_dict(checkpoint.config.to_dict()) == checkpoint.config
    model = load_model(checkpoint)
    lengths = torch.tensor([9, 5, 1])
    attention_mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1, 99, (3, 9)) * attention_mask
    token_type_ids = torch.randint(0, 2, (3, 9)) * attention_mask
    with torch.inference_mode():
        ours = model(input_ids, attention_mask, token_type_ids)
        hidden = hf_model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
    weights = attention_mask.unsqueeze(-1).float()
    expected = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    error = (ours - expected).abs().max().item()
    assert error <= 1e-5, f"max abs diff {error:.3g}"


def test_missing_config_key_names_file_and_key(tiny_bert):
    directory, _ = tiny_bert
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    del config["num_attention_heads"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError) as info:
        open_checkpoint(directory)
    assert str(config_path) in str(info.value) and "'num_attention_heads'" in str(info.value)


def _write_sentence_transformers_dir(directory: Path, *, modules: list[str], pooling: str) -> Path:
    modules_json = [{"idx": i, "name": str(i), "path": "1_Pooling" if kind == "Pooling" else "",
                     "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)]
    (directory / "modules.json").write_text(json.dumps(modules_json))
    (directory / "1_Pooling").mkdir()
    modes = ("cls_token", "mean_tokens", "max_tokens")
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({f"pooling_mode_{mode}": mode == pooling for mode in modes}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    return directory / "config.json"


TINY_HF_CONFIG = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64}


def test_sentence_transformers_folder_sets_max_seq_len(tmp_path):
    path = _write_sentence_transformers_dir(tmp_path, modules=["Transformer", "Pooling", "Normalize"],
                                            pooling="mean_tokens")
    assert BertConfig.from_hf(TINY_HF_CONFIG, path).max_seq_len == 16


@pytest.mark.parametrize("modules, pooling, hf_overrides, problem", [
    (["Transformer", "Pooling", "Normalize"], "cls_token", {}, "pooling pooling_mode_cls_token"),
    (["Transformer", "Pooling"], "mean_tokens", {}, "pipeline Transformer -> Pooling"),
    (["Transformer", "Pooling", "Normalize"], "mean_tokens", {"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    (["Transformer", "Pooling", "Normalize"], "mean_tokens", {"position_embedding_type": "relative_key"},
     "position_embedding_type 'relative_key'"),
])
def test_unsupported_encoders_are_refused(tmp_path, modules, pooling, hf_overrides, problem):
    path = _write_sentence_transformers_dir(tmp_path, modules=modules, pooling=pooling)
    with pytest.raises(UnsupportedError, match=problem):
        BertConfig.from_hf({**TINY_HF_CONFIG, **hf_overrides}, path)


def test_invalid_config_value_names_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="must be a multiple of n_heads") as info:
        BertConfig.from_hf({**TINY_HF_CONFIG, "num_attention_heads": 5}, path)
    assert info.value.path == path


def test_smoothquant_int8_encoder_stays_within_0_999_of_fp32(minilm_dir, minilm_int8):
    """embedding-int8: per-token int8 activations lose most at BERT's outlier channels (LayerNorm outputs);
    SmoothQuant moves them into the weights, kept as an explicit 1/s multiply that query/key/value share."""
    from safetensors.torch import load_file

    from edgeforge.quantize import load_quantized_model
    from edgeforge.quantize.modules import QuantizedLinear

    stored = load_file(str(minilm_int8 / "model.safetensors"))
    prefix = "encoder.layer.0.attention.self"
    assert torch.equal(stored[f"{prefix}.query.input_multiplier"], stored[f"{prefix}.value.input_multiplier"])
    multiplier = stored["encoder.layer.0.intermediate.dense.input_multiplier"]
    assert multiplier.shape == (384,) and multiplier.std() > 0.05  # really per channel, not ~1
    model = load_quantized_model(minilm_int8)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 36 and all(m.input_multiplier is not None for m in linears)
    sentences = json.loads((MINILM / "reference" / "sentences.json").read_text())
    reference = torch.from_numpy(np.load(MINILM / "reference" / "embeddings_fp32.npy"))
    cosine = F.cosine_similarity(embed(model, HFTokenizer.from_dir(MINILM), sentences), reference, dim=-1)
    assert cosine.mean() >= 0.999 and cosine.min() >= 0.999, cosine  # measured 0.99937 / 0.99921 (RTN: 0.99882)
