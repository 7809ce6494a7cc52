"""ExecuTorch export: .pte programs with the XNNPACK delegate against their eager models, the integers
XNNPACK receives, ExecuTorch's LLM runner, encoders, the miscompile guard and refusals.

Tolerances (decoders: logits over a prefill then single-token decode steps through each side's KV cache):
- fp32 and 8da8w: max |logit difference| <= 1e-4 against the eager model, top-1 identical everywhere
  (measured 1e-5: float summation order; XNNPACK's per-token int8 activation rounding is the eager
  model's), and the LLM runner's greedy text is the eager model's.
- 8da4w: XNNPACK keeps group-wise scales in bf16. The integers and scales XNNPACK receives are the
  checkpoint's, bit for bit; the eager model computes with them rounded to bf16 (its xnnpack numerics),
  matches each lowered linear to 1e-5 of its scale and (tiny model) the .pte's logits to 1e-4; end to
  end on stories260K a rounding flip now and then cascades through the KV cache, so: cosine >= 0.999 and
  top-1 >= 0.90, the scheme's own guard limits (no widened tolerance is recorded). The runner's greedy tokens
  are the .pte's own (DecoderSession) greedy tokens, and each is the eager model's argmax after the
  same prefix or within 0.5 logit of it (a near-tie).
- encoders: fp32 cosine >= 0.999 against the eager fp32 model (measured 1 - 1e-12). int8 (8da8w):
  cosine >= 0.995 against the eager int8 model (measured 0.9991: see edgeforge.export.tolerance), and
  no further from the fp32 reference than the eager int8 model is (within 0.001).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, load_model, open_checkpoint
from edgeforge.errors import ConfigError, GateFailed, InputError, UnsupportedError
from edgeforge.export import Target, export, open_source
from edgeforge.export.executorch.graph import ENCODER_MAX_BATCH, export_program, structural_copy
from edgeforge.export.executorch.layers import to_lowerable
from edgeforge.export.executorch.lower import delegation_report, kernel_name, lower
from edgeforge.export.executorch.session import DecoderSession, load_method, register_kernels
from edgeforge.export.guard import compare_logits, decode_logits, describe as describe_guard
from edgeforge.export.tolerance import widened_tolerance
from edgeforge.models.llama import LlamaConfig
from edgeforge.quantize import load_quantized_model, load_recipe, quantize_checkpoint
from edgeforge.quantize.calibration import build_calibration
from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear
from tests.conftest import MINILM, SHARED
from tests.tolerances import assert_greedy_is_argmax, assert_same_top1_except_near_ties
from tests.writers import core_state, random_llama, write_hf

TEXT = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
RECIPES = {"8da8w": "int8-dynamic", "8da4w": "int4-gptq", "8w": "int8-weight-only"}
TINY_RECIPES = {"8da8w": "int8-dynamic", "8da4w": "int4-xnnpack", "8w": "int8-weight-only"}  # data-free
TINY = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96, max_seq_len=128)
MAX_SEQ_LEN = 128
XNNPACK_8W = Target(name="xnnpack-8w", format="pte", backend="xnnpack", schemes=("fp32", "8w"),
                    latency="here")  # a target that lets 8w past the scheme check


# ---- fixtures ----

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random GQA Llama (4 query heads, 2 kv heads) as a Hugging Face checkpoint, and its quantized forms."""
    root = tmp_path_factory.mktemp("tiny")
    hf = write_hf(root / "hf", TINY, core_state(random_llama(TINY)))
    made = {"fp32": hf}

    def get(scheme: str) -> Path:
        if scheme not in made:
            made[scheme] = root / scheme
            quantize_checkpoint(open_checkpoint(hf), load_recipe(TINY_RECIPES[scheme]), calibration=None,
                                output_dir=made[scheme])
        return made[scheme]

    return get


@pytest.fixture(scope="module")
def tiny_fp32_artifact(tiny_llama, tmp_path_factory):
    return export(tiny_llama("fp32"), "host", tmp_path_factory.mktemp("tiny-pte") / "fp32", max_seq_len=64)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """scheme -> stories260K checkpoint: the bundled fp32 one, or quantized (GPTQ on a few samples)."""
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    made = {"fp32": DEFAULT_CHECKPOINT}

    def get(scheme: str) -> Path:
        if scheme not in made:
            calibration = build_calibration(TEXT, checkpoint.tokenizer, samples=8, seq_len=64, seed=0)
            made[scheme] = tmp_path_factory.mktemp(scheme) / "q"
            quantize_checkpoint(checkpoint, load_recipe(RECIPES[scheme]), calibration=calibration,
                                output_dir=made[scheme])
        return made[scheme]

    return get


@pytest.fixture(scope="module")
def story_tokens():
    tokenizer = open_checkpoint(DEFAULT_CHECKPOINT).tokenizer
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    ids = [t for p in paragraphs[:20] for t in tokenizer.encode(p)]
    return torch.tensor([ids[:96]])


# ---- helpers ----

def eager_model(path: Path):
    return load_quantized_model(path) if (Path(path) / "edgeforge.json").exists() else load_model(open_checkpoint(path))


def logits_pair(model, session_forward, tokens, prefill):
    model.setup_cache(1, MAX_SEQ_LEN)
    return decode_logits(model, tokens, prefill), decode_logits(session_forward, tokens, prefill)


def runner_pieces(artifact, prompt: str, max_new_tokens: int) -> list[str]:
    """Greedy text pieces from ExecuTorch's LLM runner (the C++ TextLLMRunner), fed the artifact's tokenizer."""
    register_kernels()
    from executorch.extension.llm.runner._llm_runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(artifact.model_file), str(artifact.path / artifact.record.report.runner_tokenizer))
    pieces: list[str] = []
    config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0, num_bos=1)
    runner.generate(prompt, config, token_callback=pieces.append)
    return pieces


class Linears(torch.nn.Module):
    """Independent linears in one graph: ``forward(*inputs)`` -> each linear applied to its own input."""

    def __init__(self, linears):
        super().__init__()
        self.linears = torch.nn.ModuleList(linears)

    def forward(self, *inputs):
        return tuple(linear(x) for linear, x in zip(self.linears, inputs))


def assert_layers_exact(model, tokens, tmp_path):
    """Every quantized linear of ``model``, lowered through XNNPACK and fed the inputs it sees in an eager
    prefill of ``tokens``, gives the eager outputs to 1e-5 of their scale: the end-to-end gap is float
    summation order moving an int8 activation rounding now and then, and the KV cache keeping it."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: seen.update({name: (args[0], output)})) for name in names]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    linears = to_lowerable(structural_copy(Linears([model.get_submodule(name) for name in names])))
    inputs = tuple(seen[name][0] for name in names)
    program = lower(torch.export.export(linears, inputs), backend="xnnpack")
    (tmp_path / "linears.pte").write_bytes(program.buffer)
    method = load_method(tmp_path / "linears.pte")
    outputs = method.execute(list(inputs))
    for name, actual in zip(names, outputs):
        expected = seen[name][1]
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@torch.no_grad()
def greedy(forward, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens through ``forward(tokens, input_pos)`` and its KV cache."""
    logits = forward(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids)))[0, -1]
    tokens = []
    for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
        tokens.append(int(logits.argmax()))
        logits = forward(torch.tensor([[tokens[-1]]]), torch.tensor([position]))[0, -1]
    return tokens


# ---- decoders ----

def test_gqa_fp32_pte_matches_eager_and_reports_what_runs_where(tiny_llama, tiny_fp32_artifact):
    artifact = tiny_fp32_artifact
    record, report = artifact.record, artifact.record.report
    assert record.guard.passed and record.guard.positions == 64
    assert report.model_file == "model.pte" and artifact.model_file.is_file()
    assert report.total_ops == report.delegated_ops + sum(report.ops_outside_delegate.values())
    outside = report.ops_outside_delegate
    assert outside["llama::update_cache.out"] == 2 and outside["llama::custom_sdpa.out"] == 1  # ExecuTorch's custom ops
    assert not [name for name in outside if name.split("::")[-1].split(".")[0] in ("linear", "mm", "addmm", "bmm")]
    assert report.delegated_parameter_share > 0.5  # all but the embedding table
    assert report.planned_memory_bytes > 0 and report.runner_tokenizer is None  # this checkpoint has none
    assert record.versions["executorch"] and record.versions["torchao"]
    assert report.guard_tolerance is None

    tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    reference, candidate = logits_pair(eager_model(tiny_llama("fp32")), artifact.open().forward, tokens, 40)
    assert (reference - candidate).abs().max() <= 1e-4
    assert_same_top1_except_near_ties(reference, candidate)

    from executorch.runtime import Runtime

    program = Runtime.get().load_program(artifact.model_file)
    metadata = {name: program.load_method(name).execute([]) for name in report.runner_metadata}
    assert metadata["get_max_seq_len"] == [64] and metadata["get_max_context_len"] == [64]
    assert metadata["get_vocab_size"] == [TINY.vocab_size] and metadata["use_kv_cache"] == [True]
    assert metadata["use_sdpa_with_kv_cache"] == [True] and metadata["enable_dynamic_shape"] == [True]


@pytest.mark.parametrize("scheme", ["8da8w", "8da4w"])
def test_xnnpack_receives_edgeforge_integers_and_scales(scheme, tiny_llama, tmp_path):
    source = open_source(tiny_llama(scheme))
    program = lower(export_program(source, max_seq_len=MAX_SEQ_LEN), backend="xnnpack")
    delegated = {}
    graph_module = program.exported_program().graph_module
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and kernel_name(node) == "executorch_call_delegate":
            delegated.update(getattr(graph_module, node.args[0].target).original_module.state_dict)
    linears = {name: m for name, m in source.model.named_modules() if isinstance(m, QuantizedLinear)}
    grouped = [m for m in linears.values() if m.scheme.bits == 4 and m.scale.shape[1] > 1]
    assert linears and bool(grouped) == (scheme == "8da4w")
    for name, module in linears.items():  # DynamicInt8Linear's buffers (per-channel scales as a vector)
        assert torch.equal(delegated[f"core.{name}.qdata"], module.qdata), name
        assert torch.equal(delegated[f"core.{name}.scale"].reshape(module.scale.shape), module.scale), name
    report = delegation_report(program.exported_program())
    assert "quantized_decomposed::embedding_byte.out" in report["ops_outside_delegate"]  # int8 table, no float copy
    assert 0.5 < report["delegated_parameter_share"] < 1  # the integer linears inside, the embedding table outside
    embedding, kept = source.model.tok_embeddings, program.exported_program().state_dict
    assert isinstance(embedding, QuantizedEmbedding)
    assert torch.equal(kept["core.tok_embeddings.parametrizations.weight.original0"], embedding.qdata)
    assert torch.equal(kept["core.tok_embeddings.parametrizations.weight.original1"], embedding.scale)

    (tmp_path / "model.pte").write_bytes(program.buffer)
    session = DecoderSession(tmp_path / "model.pte", max_seq_len=MAX_SEQ_LEN)
    tokens = torch.randint(0, TINY.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    exact = eager_model(source.path)  # xnnpack numerics: group-wise scales in bf16, as XNNPACK holds them
    reference, candidate = logits_pair(exact, session.forward, tokens, 64)
    assert (reference - candidate).abs().max() <= 1e-4, (reference - candidate).abs().max()
    assert widened_tolerance(source) is None


def test_xnnpack_targets_of_one_numerics_lower_to_the_same_program(tiny_llama, tmp_path):
    """host, Android, iOS and arm64 Linux differ in where the .pte runs, not in what it is: the same bytes
    (so a host run of the file checks what ships to the phone)."""
    programs = {name: (export(tiny_llama("8da4w"), name, tmp_path / name, max_seq_len=64).path / "model.pte")
                .read_bytes() for name in ("host", "android-arm64-xnnpack")}
    assert programs["host"] == programs["android-arm64-xnnpack"]


def test_int8_weight_only_through_xnnpack_is_refused_and_nothing_is_written(tiny_llama, tmp_path):
    """XNNPACK's weight-only int8 linear drops the scale (it computes x @ qᵀ): the guard must refuse it, against
    the eager model and on drift from fp32 alike."""
    output = tmp_path / "out" / "model.pte.d"
    with pytest.raises(GateFailed) as failure:
        export(tiny_llama("8w"), XNNPACK_8W, output, max_seq_len=64)
    assert failure.value.exit_code == 1
    assert "disagree with the eager 8w model" in str(failure.value) and "8da8w" in str(failure.value)
    assert "the fp32-drift test refuses it too" in str(failure.value)
    assert not output.exists() and list(output.parent.iterdir()) == []  # no artifact, no temporary sibling


def test_export_refuses_a_scheme_the_target_does_not_run_and_names_one_that_does(tiny_llama, tmp_path):
    with pytest.raises(ConfigError) as refusal:
        export(tiny_llama("8w"), "host", tmp_path / "out")
    assert refusal.value.exit_code == 2
    assert "does not run scheme 8w" in str(refusal.value) and "onnx-cpu" in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_pte_backends_are_refused_before_exporting(tiny_llama, tmp_path):
    npu = Target(name="npu", format="pte", backend="vendor-npu", schemes=("fp32",), latency="")
    with pytest.raises(UnsupportedError, match="backend 'vendor-npu'.*supported: xnnpack, coreml"):
        export(tiny_llama("fp32"), npu, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ios_coreml_decoder_is_one_delegate_with_the_cache_as_state(tiny_llama, tmp_path):
    """The core model with its static cache, one token per call: CoreML takes the whole graph, the KV cache
    becoming CoreML state (iOS 18+); the runner metadata says to prefill token by token."""
    artifact = export(tiny_llama("fp32"), "ios-coreml", tmp_path / "coreml", max_seq_len=32)
    report = artifact.record.report
    assert artifact.record.guard is None and report.ops_outside_delegate == {}
    assert report.delegated_parameter_share == 1.0
    assert report.runner_metadata["enable_dynamic_shape"] is False
    assert report.runner_metadata["use_sdpa_with_kv_cache"] is False
    with pytest.raises(UnsupportedError, match="ios-coreml cannot run here"):
        artifact.open()


def test_ios_coreml_encoder_is_lowered_whole_and_refuses_to_run_here(minilm_dir, tmp_path):
    """CoreML lowers ahead of time on Linux (coremltools) but executes on Apple devices only: the artifact is
    written with its guard marked as not run, and verify/bench refuse it instead of guessing."""
    artifact = export(minilm_dir, "ios-coreml", tmp_path / "coreml")
    report = artifact.record.report
    assert artifact.record.guard is None and artifact.record.target.runs_here is False
    assert report.ops_outside_delegate == {} and report.delegated_parameter_share == 1.0
    assert 1.9 < report.bytes_per_parameter < 2.1  # an fp16 ML program inside the .pte, not fp32 weights
    with pytest.raises(UnsupportedError, match="ios-coreml cannot run here: on Apple devices only"):
        artifact.open()


def test_decoder_session_refuses_positions_outside_the_cache(tiny_fp32_artifact):
    session = tiny_fp32_artifact.open()
    with pytest.raises(InputError, match="outside the program's 0..63"):
        session.forward(torch.tensor([[1, 2]]), torch.tensor([63, 64]))
    with pytest.raises(InputError, match="expected tokens"):
        session.forward(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(InputError, match="consecutive"):
        session.forward(torch.tensor([[1, 2]]), torch.tensor([3, 5]))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp32", "8da8w", "8da4w"])
def test_stories_pte_matches_eager_and_runs_in_the_llm_runner(scheme, stories, story_tokens, tmp_path):
    path = stories(scheme)
    artifact = export(path, "host", tmp_path / "pte", max_seq_len=MAX_SEQ_LEN)
    assert artifact.record.guard.passed and artifact.record.guard.positions == 96
    assert artifact.record.report.runner_tokenizer == "tok512.model"
    assert (artifact.path / "tok512.model").is_file()
    session, model = artifact.open(), eager_model(path)
    reference, candidate = logits_pair(model, session.forward, story_tokens, 64)
    if scheme == "8da4w":  # close end to end, exact layer by layer
        result = compare_logits(reference, candidate, scheme)
        assert result.min_cosine >= 0.999 and result.top1_agreement >= 0.90, result
        assert artifact.record.report.guard_tolerance is None
        assert_layers_exact(model, story_tokens[:, :64], tmp_path)
    else:
        assert (reference - candidate).abs().max() <= 1e-4, (reference - candidate).abs().max()
        assert_same_top1_except_near_ties(reference, candidate)

    tokenizer = open_checkpoint(DEFAULT_CHECKPOINT).tokenizer
    prompt, new_tokens = "Once upon a time", 32
    pieces = runner_pieces(artifact, prompt, new_tokens)
    assert len(pieces) == new_tokens
    session_tokens = greedy(session.forward, tokenizer.encode(prompt), new_tokens)
    assert "".join(pieces).strip() == tokenizer.decode(session_tokens).strip()  # the runner runs the same program
    eager = eager_model(path)
    eager.setup_cache(1, MAX_SEQ_LEN)
    # teacher-forced: each runner token is eager's argmax after the same prefix, or a near-tie within the
    # logit differences this module's docstring bounds (1e-4; 8da4w: bf16 group scales, 0.5)
    assert_greedy_is_argmax(session_tokens, eager, tokenizer.encode(prompt), 0.5 if scheme == "8da4w" else 2e-4)


# ---- encoders ----

@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    """A random 2-layer transformers BertModel with MiniLM's tokenizer files (the guard encodes sentences)."""
    return tiny_bert_dir


def test_encoder_pte_has_dynamic_batch_and_length(tiny_bert, tmp_path):
    artifact = export(tiny_bert, "host", tmp_path / "pte")
    assert artifact.record.guard.passed and artifact.record.report.runner_metadata is None
    guard = artifact.record.guard  # what was measured: cosine over sentences, no top token to agree on
    assert guard.sentences == 4 and guard.min_cosine >= 0.999 and guard.top1_agreement is None, guard
    assert describe_guard(guard) == f"passed against the eager model: min cosine {guard.min_cosine:.5f} over 4 sentences"
    session, model = artifact.open(), eager_model(tiny_bert)
    tokenizer = open_checkpoint(tiny_bert).tokenizer
    batches = (["hello"], ["a man is eating food.", "a", "the quick brown fox jumps over the lazy dog"],
               [f"sentence number {i} of a batch larger than the graph's" for i in range(ENCODER_MAX_BATCH + 3)])
    for texts in batches:
        inputs = tokenizer.encode_batch(texts, max_length=64)
        with torch.no_grad():
            reference = model(*inputs)
        candidate = session.embed(*inputs)
        assert candidate.shape == reference.shape
        assert F.cosine_similarity(reference, candidate).min() >= 0.999
        assert (reference - candidate).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp32", "8da8w"])
def test_minilm_pte_embeddings_match_the_fp32_reference(scheme, minilm_dir, minilm_int8, tmp_path):
    import json

    path = minilm_dir if scheme == "fp32" else minilm_int8
    artifact = export(path, "host", tmp_path / "pte")
    assert artifact.record.guard.passed
    sentences = json.loads((MINILM / "reference" / "sentences.json").read_text())
    reference = torch.from_numpy(np.load(MINILM / "reference" / "embeddings_fp32.npy"))
    tokenizer = open_checkpoint(path).tokenizer
    inputs = tokenizer.encode_batch(sentences, max_length=256)
    candidate = artifact.open().embed(*inputs)
    cosine = F.cosine_similarity(candidate, reference)
    if scheme == "fp32":
        assert cosine.min() >= 0.999, cosine
        return
    with torch.no_grad():
        eager = eager_model(path)(*inputs)
    assert F.cosine_similarity(candidate, eager).min() >= 0.995
    assert (cosine - F.cosine_similarity(eager, reference)).min() >= -0.001
    assert cosine.mean() >= 0.999, cosine  # SmoothQuant int8: measured 0.99937 mean, 0.99921 min


def test_guard_top1_counts_near_ties_as_agreement_but_not_real_flips():
    """Random-weight models are full of near-ties; a flip between tokens the eager model finds equally likely
    (within 0.01 nats) is not a disagreement, a flip away from a clear winner is."""
    reference = torch.tensor([[2.0, 2.0 - 0.005, 0.0], [3.0, 1.0, 0.0]])
    candidate = torch.tensor([[1.0, 1.1, 0.0], [1.0, 1.1, 0.0]])  # picks token 1 at both positions
    result = compare_logits(reference, candidate, "", tolerance=(-1.0, 0.0))
    assert result.top1_agreement == 0.5
