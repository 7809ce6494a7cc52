"""The CLI: results on stdout, one-line errors with exit code 2 and no traceback for every bad input."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgeforge.cli import main
from tests.conftest import STORIES
from tests.writers import core_state, random_llama, write_hf, write_meta
from tests.test_llama import GQA_TIED


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeforge: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def hf_dir(tmp_path):
    return write_hf(tmp_path / "hf", GQA_TIED, core_state(random_llama(GQA_TIED)))


def test_version_and_fast_help():
    import subprocess
    import sys

    assert run("--version").stdout.strip().startswith("edgeforge, version ")
    assert "quantize" in subprocess.run([sys.executable, "-m", "edgeforge", "--help"], check=True,
                                        capture_output=True, text=True).stdout
    # fast --help is checked by what it imports, not by a clock: a busy machine must not fail it
    probe = "import sys, edgeforge.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_inspect_bundled_model_and_json(tmp_path):
    result = run("inspect", "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.stderr
    assert "llama2c" in result.stdout and "260,032" in result.stdout
    record = json.loads((tmp_path / "info.json").read_text())
    assert record["parameter_count"] == 260032
    assert record["config"]["n_kv_heads"] == 4 and record["config"]["tie_embeddings"] is True
    assert record["tokenizer"]["bos_id"] == 1 and record["dtypes"] == {"F32": 260032}
    assert record["size_bytes"] > 1_000_000


def test_generate_bundled_model_greedy_matches_reference():
    expected = (STORIES / "greedy_reference.txt").read_text().splitlines()[4]
    result = run("generate", "-n", 40)
    assert result.exit_code == 0, result.stderr
    assert expected.startswith(result.stdout.strip()) and len(result.stdout.strip()) > 100


def test_generate_sampling_is_seeded():
    first = run("generate", "--prompt", "The dog", "-n", 20, "--temperature", 1.0, "--seed", 7).stdout
    again = run("generate", "--prompt", "The dog", "-n", 20, "--temperature", 1.0, "--seed", 7).stdout
    other = run("generate", "--prompt", "The dog", "-n", 20, "--temperature", 1.0, "--seed", 8).stdout
    assert first == again and first != other and first.startswith("The dog")


def test_unreadable_path():
    assert_one_line_error(run("inspect", "/no/such/checkpoint"), "/no/such/checkpoint", "no such file")


def test_directory_that_is_no_checkpoint(tmp_path):
    assert_one_line_error(run("inspect", tmp_path), str(tmp_path), "not a recognised checkpoint")


def test_truncated_llama2c(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes((STORIES / "stories260K.bin").read_bytes()[:500_000])
    assert_one_line_error(run("inspect", path), str(path), "truncated llama2.c checkpoint")


def test_corrupt_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:1000])
    assert_one_line_error(run("inspect", hf_dir), str(weights), "not a readable safetensors file")


def test_truncated_safetensors_data(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    assert_one_line_error(run("generate", hf_dir), str(hf_dir))


def test_missing_config_key(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("inspect", hf_dir), str(hf_dir / "config.json"), "missing config key 'hidden_size'")


def test_unknown_architecture(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("inspect", hf_dir), "config.json", "unknown architecture model_type='gpt_neox'")


def test_tensor_shape_mismatch(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] += 32
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("inspect", hf_dir), str(hf_dir), "feed_forward.w1.weight has shape (96, 64)",
                          "config implies (128, 64)")


def test_tensor_count_mismatch(tmp_path):
    state = core_state(random_llama(GQA_TIED))
    del state["layers.1.feed_forward.w3.weight"]
    path = write_hf(tmp_path / "hf", GQA_TIED, state)
    assert_one_line_error(run("inspect", path), "missing tensor layers.1.feed_forward.w3.weight")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("inspect", path), "unexpected tensor layers.1.")


def test_missing_tokenizer():
    assert_one_line_error(run("generate", STORIES / "hf"), str(STORIES / "hf"), "no tokenizer (tokenizer.json")


@pytest.mark.parametrize("command", ["quantize", "forge"])
def test_calibrated_recipe_without_a_tokenizer_fails_before_any_work(tmp_path, command):
    """Pre-flight: GPTQ calibrates on text, and a directory of config + safetensors cannot encode any."""
    out = tmp_path / "out"
    target = ["--target", "onnx-cpu"] if command == "forge" else []
    result = run(command, STORIES / "hf", "--recipe", "int4-gptq", *target, "-o", out)
    assert_one_line_error(result, f"{STORIES / 'hf'}: no tokenizer (tokenizer.json, tokenizer.model",
                          "recipe int4-gptq (gptq) calibrates on text", "int4-xnnpack")
    assert not out.exists()


def test_meta_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = write_meta(tmp_path / "meta", GQA_TIED, core_state(random_llama(GQA_TIED)))
    shard = path / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    state["evil"] = zipfile.ZipFile  # not a tensor: only a full unpickler could rebuild it
    torch.save(state, shard)
    assert_one_line_error(run("inspect", path), str(shard), "refused")


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(main, ["--debug", "inspect", "/no/such/checkpoint"])
    assert result.exit_code != 0 and result.exception is not None
    assert "no such file" in str(result.exception)


# ---- outputs never destroy inputs; one calibration rule; exit codes 3, 70, 130 ----

def files_of(directory):
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


@pytest.fixture
def quantized_copy(stories_int4, tmp_path):
    return Path(shutil.copytree(stories_int4, tmp_path / "q"))


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
@pytest.mark.parametrize("command", ["export", "quantize", "forge"])
def test_an_output_overlapping_the_input_is_refused_and_the_input_is_intact(command, relation, hf_dir,
                                                                            quantized_copy):
    source = quantized_copy if command == "export" else hf_dir
    output = {"is": source, "lies inside": source / "out", "contains": source.parent}[relation]
    options = {"export": ["--target", "onnx-cpu"], "quantize": ["--recipe", "int4-xnnpack"],
               "forge": ["--recipe", "int4-xnnpack", "--target", "onnx-cpu"]}[command]
    before, siblings = files_of(source), sorted(source.parent.iterdir())
    result = CliRunner().invoke(main, [command, str(source), *options, "-o", str(output)], catch_exceptions=False)
    assert_one_line_error(result, f"{output}: output {relation} the input ")
    assert files_of(source) == before and sorted(source.parent.iterdir()) == siblings


@pytest.mark.parametrize("command", ["quantize", "forge"])
def test_calibration_longer_than_the_context_is_refused_alike_by_quantize_and_forge(tmp_path, command):
    from edgeforge.pipeline import BUNDLED_TEXT

    out = tmp_path / "out"
    extra = ["--calib", BUNDLED_TEXT / "calibration.txt"] if command == "quantize" else ["--target", "onnx-cpu"]
    result = run(command, "--recipe", "int4-gptq", "--seq-len", 1024, *extra, "-o", out)
    assert_one_line_error(result, "stories260K", ": calibration seq_len 1024 exceeds the model's context 512: "
                                                 "pass --seq-len 512 or less")
    assert not out.exists()


def test_a_model_file_the_runtime_refuses_exits_3_with_one_line(stories_int4, tmp_path):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT
    from edgeforge.export import export
    from edgeforge.pipeline import BUNDLED_TEXT

    artifact = export(stories_int4, "onnx-cpu", tmp_path / "artifact", max_seq_len=64, check=False).path
    (artifact / "model.onnx").write_bytes(b"\x00 not a protobuf " * 64)
    result = CliRunner().invoke(main, ["verify", str(artifact), "--reference", str(DEFAULT_CHECKPOINT), "--data",
                                       str(BUNDLED_TEXT / "evaluation.txt"), "--seq-len", "64", "--windows", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 3, f"exit {result.exit_code}: {result.stderr}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeforge: error: onnxruntime could not load ") and "model.onnx" in last, last
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("raised, code, message", [
    (ValueError("planted bug\nwith a second line"), 70,
     "edgeforge: internal error: ValueError: planted bug (rerun with --debug for the traceback)"),
    (KeyboardInterrupt(), 130, "edgeforge: interrupted")])
def test_a_bug_and_an_interrupt_exit_with_their_code_and_one_line(monkeypatch, tmp_path, raised, code, message):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("edgeforge.pipeline.forge", fail)
    result = CliRunner().invoke(main, ["forge", "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}: {result.stderr}"
    assert result.stderr.strip().splitlines() == [message]
    assert "Traceback" not in result.output + result.stderr and not (tmp_path / "out").exists()
