"""The records of the quantized checkpoint and of the exported artifact: what is on disk is the record's fields
(round trip), files written before the records existed still load, and another kind or a newer schema is a
one-line error naming the file."""

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.errors import InputError
from edgeforge.export import export, open_artifact
from edgeforge.export.artifact import ArtifactRecord
from edgeforge.export.guard import GuardResult, describe
from edgeforge.quantize import QuantizedCheckpoint, read_quantized


@pytest.fixture(scope="module")
def onnx_artifact(stories_int4, tmp_path_factory):
    """stories260K int4-xnnpack exported for onnx-cpu (seconds), guard run."""
    return export(stories_int4, "onnx-cpu", tmp_path_factory.mktemp("records") / "onnx", max_seq_len=64)


def _without_nulls(data: dict) -> dict:
    """The JSON as edgeforge wrote it before the records: a layer's stats, the export report's fields and the
    guard's figures that do not apply left out instead of null."""
    def present(entry):
        return {key: value for key, value in entry.items() if value is not None}

    legacy = dict(data)
    if "layers" in legacy:
        legacy["layers"] = {name: present(layer) for name, layer in legacy["layers"].items()}
    else:
        legacy["report"], legacy["guard"] = present(legacy["report"]), present(legacy["guard"])
    return legacy


def test_quantized_checkpoint_record_is_its_json_file(stories_int4):
    data = json.loads((stories_int4 / "edgeforge.json").read_text())
    record = QuantizedCheckpoint.from_dict(data)
    assert record.to_dict() == data
    assert record == read_quantized(stories_int4)
    assert record.scheme == "8da4w" and record.source.format == "llama2c" and record.tokenizer.adds_bos
    assert record.layers["layers.0.attention.wq"].weight_scheme.bits == 4
    assert record.layers["tok_embeddings"].weight_scheme.bits == 8 and record.model_config().n_layers == 5


def test_artifact_record_is_its_json_file(onnx_artifact, stories_int4):
    data = json.loads((onnx_artifact.path / "edgeforge.json").read_text())
    record = ArtifactRecord.from_dict(data)
    assert record.to_dict() == data and record == onnx_artifact.record
    assert record.source.path == str(stories_int4) and record.source.recipe == "int4-xnnpack"
    assert record.target.name == "onnx-cpu" and record.scheme == "8da4w" and record.max_seq_len == 64
    assert record.report.model_file == "model.onnx" and record.report.size_bytes > 0
    assert isinstance(record.guard, GuardResult) and record.guard.passed and record.guard.positions == 64
    assert data["guard"]["positions"] == record.guard.positions  # the JSON keys are the field names


def test_records_written_before_the_records_existed_still_load(onnx_artifact, stories_int4, tmp_path):
    """Today's files left optional keys out (a layer without fallback, a report without size_warning, a
    decoder's guard without sentences); such a file reads as the record with those fields None."""
    for directory, record_type in ((stories_int4, QuantizedCheckpoint), (onnx_artifact.path, ArtifactRecord)):
        data = json.loads((directory / "edgeforge.json").read_text())
        legacy = _without_nulls(data)
        assert legacy != data  # there was something to leave out
        assert record_type.from_dict(legacy) == record_type.from_dict(data)
    copy = tmp_path / "artifact"
    shutil.copytree(onnx_artifact.path, copy)
    (copy / "edgeforge.json").write_text(json.dumps(_without_nulls(onnx_artifact.record.to_dict())))
    legacy = open_artifact(copy)
    assert legacy.record.guard == onnx_artifact.record.guard
    assert describe(legacy.record.guard).startswith("passed against the eager model: min cosine")


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeforge: error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def _rewrite(directory, **changes):
    file = directory / "edgeforge.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return file


@pytest.mark.parametrize("changes, problem", [({"kind": "edgeforge.artifact"}, "not a edgeforge.quantized_checkpoint"),
                                              ({"schema_version": 2}, "schema_version 2 is newer")])
def test_quantized_checkpoint_of_another_kind_or_newer_schema_is_refused(changes, problem, stories_int4, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(stories_int4, copy)
    file = _rewrite(copy, **changes)
    _one_line_error(CliRunner().invoke(main, ["inspect", str(copy)]), str(file), problem)


def test_artifact_of_a_newer_schema_is_refused_and_of_another_kind_named(onnx_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(onnx_artifact.path, copy)
    file = _rewrite(copy, schema_version=7)
    _one_line_error(CliRunner().invoke(main, ["bench", str(copy)]), str(file), "schema_version 7 is newer")
    _rewrite(copy, schema_version=1, kind="edgeforge.verify_report")
    with pytest.raises(InputError, match="not a edgeforge.artifact record .kind 'edgeforge.verify_report'") as error:
        open_artifact(copy)
    assert str(file) in str(error.value)
