"""An exporter from outside the package: a fake installed distribution on sys.path declares the format ``toy``
(fp32 weights in an .npz, run by a numpy decoder) in the entry point group ``edgeforge.exporters``, a target
TOML names that format, and ``edgeforge export`` / ``verify`` use it with no edit inside edgeforge/. Checkpoint
formats come in the same way (``edgeforge.formats``), edgeforge's own quantized format included."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, FORMATS, load_model, open_checkpoint
from edgeforge.cli import main
from edgeforge.export.artifact import EXPORTERS, open_artifact
from edgeforge.export.guard import decode_logits, fixed_sequence
from edgeforge.pipeline import BUNDLED_TEXT
from tests.writers import write_plugin_distribution

TOY_EXPORTER = '''
"""The toy exporter: fp32 weights and RoPE tables as model.npz, a numpy decoder with a growing KV cache."""

import numpy as np
import torch

MODEL_FILE = "model.npz"


class ToyExporter:
    name = "toy"
    runtime_package = "numpy"

    def export(self, source, target, out_dir, *, max_seq_len, phase):
        phase("write", "fp32 weights as .npz")
        arrays = {name: tensor.detach().float().numpy() for name, tensor in source.model.state_dict().items()}
        arrays["rope_cos"] = source.model.rope_cos[:max_seq_len].float().numpy()
        arrays["rope_sin"] = source.model.rope_sin[:max_seq_len].float().numpy()
        np.savez(out_dir / MODEL_FILE, **arrays)
        return {"model_file": MODEL_FILE, "versions": {"numpy": np.__version__}}

    def open(self, artifact_dir, record):
        return NumpyDecoder(np.load(artifact_dir / record.report.model_file), record.model_config())

    def prepare_runtime(self, threads):
        return ", numpy"


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


class NumpyDecoder:
    """forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]; position 0 starts a new sequence."""

    def __init__(self, weights, config):
        self.w = {name: weights[name].astype(np.float64) for name in weights.files}
        self.heads, self.kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.layers, self.eps = config.n_layers, config.norm_eps

    def forward(self, tokens, input_pos):
        w, positions = self.w, input_pos.numpy()
        if positions[0] == 0:
            self.cache = [(np.zeros((0, self.kv_heads, self.head_dim)),) * 2 for _ in range(self.layers)]
        x = w["tok_embeddings.weight"][tokens.numpy()[0]]
        cos, sin = w["rope_cos"][positions][:, None], w["rope_sin"][positions][:, None]
        allowed = np.arange(positions[-1] + 1)[None, :] <= positions[:, None]
        for i in range(self.layers):
            layer = f"layers.{i}."
            h = rms_norm(x, w[layer + "attention_norm.weight"], self.eps)
            q, k, v = (h @ w[f"{layer}attention.{name}.weight"].T for name in ("wq", "wk", "wv"))
            q = rope(q.reshape(len(x), self.heads, self.head_dim), cos, sin)
            k = rope(k.reshape(len(x), self.kv_heads, self.head_dim), cos, sin)
            keys = np.concatenate([self.cache[i][0], k])
            values = np.concatenate([self.cache[i][1], v.reshape(len(x), self.kv_heads, self.head_dim)])
            self.cache[i] = keys, values
            groups = self.heads // self.kv_heads
            scores = np.einsum("shd,thd->hst", q, np.repeat(keys, groups, 1)) / np.sqrt(self.head_dim)
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            attended = np.einsum("hst,thd->shd", probs, np.repeat(values, groups, 1)).reshape(len(x), -1)
            x = x + attended @ w[layer + "attention.wo.weight"].T
            h = rms_norm(x, w[layer + "ffn_norm.weight"], self.eps)
            gate = h @ w[layer + "feed_forward.w1.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * (h @ w[layer + "feed_forward.w3.weight"].T)) \\
                @ w[layer + "feed_forward.w2.weight"].T
        logits = rms_norm(x, w["norm.weight"], self.eps) @ w["output.weight"].T
        return torch.from_numpy(logits[None].astype(np.float32))
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A distribution ``toyplugin`` installed only on sys.path, whose entry point adds the exporter ``toy``."""
    site = write_plugin_distribution(tmp_path / "site", EXPORTERS.group, {"toy": "toy_exporter:ToyExporter"},
                                     {"toy_exporter": TOY_EXPORTER})
    monkeypatch.syspath_prepend(str(site))
    with EXPORTERS.isolated():  # the loaded toy goes with the fixture
        yield
        monkeypatch.undo()
    sys.modules.pop("toy_exporter", None)


def write_toy_target(path):
    path.write_text(textwrap.dedent('''
        description = "fp32 weights run by numpy (a plugin's exporter)"
        format = "toy"
        backend = "numpy"
        schemes = ["fp32"]
        latency = "numpy on this machine's CPU"
    '''))
    return path


def test_a_plugin_exporter_is_listed_and_used_by_export_and_verify(toy_plugin, tmp_path):
    assert "toy" in EXPORTERS.names() and {"onnx", "pte"} <= set(EXPORTERS.names())
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "[onnx|pte|toy]" in help_text, help_text

    target, out = write_toy_target(tmp_path / "toy.toml"), tmp_path / "toy-artifact"
    result = CliRunner().invoke(main, ["export", str(DEFAULT_CHECKPOINT), "--target", str(target), "--format", "toy",
                                       "-o", str(out), "--max-seq-len", "128"], catch_exceptions=False)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}{result.stderr}"
    artifact = open_artifact(out)
    guard = artifact.record.guard
    assert artifact.format == "toy" and (out / "model.npz").is_file() and guard.passed, artifact.record
    assert guard.min_cosine >= 0.99999 and guard.top1_agreement == 1.0, guard  # fp32's own tolerance

    model = load_model(open_checkpoint(DEFAULT_CHECKPOINT))
    model.setup_cache(1, 128)
    tokens = fixed_sequence(model.config.vocab_size, 64)
    eager = decode_logits(model, tokens, 32)
    toy = decode_logits(artifact.open().forward, tokens, 32)
    assert torch.allclose(toy, eager, atol=1e-4), (toy - eager).abs().max()  # 32 decode steps through the cache

    report = tmp_path / "verify.json"
    result = CliRunner().invoke(main, ["verify", str(out), "--reference", str(DEFAULT_CHECKPOINT), "--data",
                                       str(BUNDLED_TEXT / "evaluation.txt"), "--seq-len", "64", "--windows", "2",
                                       "--json", str(report)], catch_exceptions=False)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}{result.stderr}"
    drift = json.loads(report.read_text())["drift"]
    assert drift["kld_mean_nats"] < 1e-6, drift  # fp32 weights in numpy: no drift from the fp32 reference


def test_a_target_naming_an_uninstalled_format_exits_2_listing_the_installed_ones(tmp_path):
    target = write_toy_target(tmp_path / "toy.toml")
    result = CliRunner().invoke(main, ["export", str(DEFAULT_CHECKPOINT), "--target", str(target),
                                       "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}{result.stderr}"
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"edgeforge: error: {target}: target key 'format': unknown artifact format 'toy' "
                    "(installed: onnx, pte)"), last
    assert not (tmp_path / "out").exists()


TOY_FORMAT = '''
"""A llama2.c file under another suffix, opened as the checkpoint format "toy"."""

from dataclasses import replace

from edgeforge.checkpoints import FORMATS, checkpoint_format


@checkpoint_format("toy", detect=lambda path: path.suffix == ".toyckpt")
def open_toy(path):
    return replace(FORMATS.get("llama2c").open(path), format="toy")
'''


def test_a_plugin_checkpoint_format_is_detected_and_offered_by_inspect(tmp_path, monkeypatch):
    site = write_plugin_distribution(tmp_path / "site", FORMATS.group, {"toy": "toy_format:open_toy"},
                                     {"toy_format": TOY_FORMAT})
    monkeypatch.syspath_prepend(str(site))
    with FORMATS.isolated():
        try:
            model = shutil.copyfile(DEFAULT_CHECKPOINT, tmp_path / "stories.toyckpt")
            shutil.copyfile(DEFAULT_CHECKPOINT.parent / "tok512.bin", tmp_path / "tok512.bin")
            assert "[edgeforge|gguf|hf|llama2c|meta|toy]" in CliRunner().invoke(main, ["inspect", "--help"]).output
            result = CliRunner().invoke(main, ["inspect", str(model), "--json", "-"], catch_exceptions=False)
            assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}{result.stderr}"
            record = json.loads(result.output)
            assert record["format"] == "toy" and record["parameter_count"] == 260_032, record
        finally:
            monkeypatch.undo()
    sys.modules.pop("toy_format", None)


def test_a_quantized_checkpoint_is_detected_through_its_entry_point(stories_int4, monkeypatch):
    with FORMATS.isolated(empty=True):  # nothing loaded or registered: only the installed entry points
        assert open_checkpoint(stories_int4).format == "edgeforge"
        assert open_checkpoint(DEFAULT_CHECKPOINT).format == "llama2c"
