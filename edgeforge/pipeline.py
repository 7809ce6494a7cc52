"""`forge`: quantize -> export -> verify -> bench -> report, in one call.

Each stage writes its output under the forge directory and records a key: the SHA-256 of its
inputs' content and its settings. A rerun reuses every stage whose key is unchanged and whose
output is still there, so an interrupted run resumes where it stopped. Outputs are written to a
temporary sibling and renamed into place, so an interrupted stage leaves nothing half-written.

    OUT/quantized/      edgeforge quantized checkpoint
    OUT/artifact/       exported artifact (.pte or ONNX) + tokenizer + manifest
    OUT/verify.json     drift of the artifact against the fp32 reference
    OUT/bench.json      latency of the artifact and of the reference
    OUT/report.json, OUT/report.html
    OUT/forge-state.json  stage keys and records
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edgeforge.fileio import content_sha256, read_json, refuse_overlap, write_json_atomic

if TYPE_CHECKING:
    from edgeforge.report import ExportStage, ForgeReport, QuantizeStage, StageTiming
    from edgeforge.verify.bench_record import BenchReport
    from edgeforge.verify.report import VerifyReport

S = TypeVar("S")
STATE_FILE = "forge-state.json"
BUNDLED_TEXT = Path(__file__).resolve().parent / "data" / "tinystories"
BUNDLED_CALIBRATION = {"samples": 64, "seq_len": 256}  # the bundled sample holds ~55k tokens: fewer than most recipes ask


@dataclass(frozen=True)
class ForgeSettings:
    """What `forge` does: recipe and target (a name or a TOML path); calib/data: calibration and evaluation
    text (default: the bundled TinyStories samples, calibrated with BUNDLED_CALIBRATION's samples and
    seq_len); samples/seq_len/seed override the recipe's calibration settings; max_seq_len sizes the
    exported KV cache; eval_seq_len/eval_windows shape verify; repetitions for bench."""

    recipe: str = "int4-gptq"
    target: str = "host"
    checkpoint: str | None = None
    calib: str | None = None
    data: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    max_seq_len: int | None = None
    eval_seq_len: int = 256
    eval_windows: int = 32
    repetitions: int = 5
    bandwidth_bytes: int | None = None


@dataclass
class ForgeResult:
    output_dir: Path
    report: ForgeReport
    reused: list[str]


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _Stages:
    """Runs stages in order, reusing those whose key and output are unchanged; the state file keeps each stage's
    key, seconds and record (read back as its type)."""

    def __init__(self, output_dir: Path, say: Callable[[str], None]):
        self.output_dir, self.say = output_dir, say
        self.path = output_dir / STATE_FILE
        self.state = read_json(self.path) if self.path.exists() else {"stages": {}}
        self.reused: list[str] = []
        self.timings: dict[str, StageTiming] = {}

    def run(self, name: str, key: str, output: Path, work: Callable[[], S], record_type: type[S]) -> S:
        from edgeforge.records import decode, encode
        from edgeforge.report import StageTiming

        prior = self.state["stages"].get(name)
        if prior and prior["key"] == key and output.exists():
            self.say(f"[{name}] reused: inputs unchanged ({output})")
            self.reused.append(name)
            self.timings[name] = StageTiming(seconds=prior["seconds"], reused=True)
            return decode(record_type, prior["record"], where=f"{self.path}: stages.{name}.record")
        self.say(f"[{name}] running ...")
        start = time.perf_counter()
        record = work()
        seconds = round(time.perf_counter() - start, 3)
        self.state["stages"][name] = {"key": key, "seconds": seconds, "record": encode(record)}
        write_json_atomic(self.path, self.state)
        self.timings[name] = StageTiming(seconds=seconds, reused=False)
        self.say(f"[{name}] done in {seconds:.1f} s")
        return record


def forge(settings: ForgeSettings, output_dir: str | Path, *,
          progress: Callable[[str], None] | None = None) -> ForgeResult:
    """Run the whole pipeline into ``output_dir``; see the module docstring for the layout."""
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
    from edgeforge.export import load_target
    from edgeforge.quantize import load_recipe
    from edgeforge.quantize.calibration import check_calibration, read_documents, with_calibration
    from edgeforge.quantize.driver import require_calibration_tokenizer
    from edgeforge.quantize.record import RecipeRecord
    from edgeforge.records import decode
    from edgeforge.report import ExportStage, ForgeSource, QuantizeStage, build_report, write_html
    from edgeforge.verify.bench_record import BenchReport
    from edgeforge.verify.report import VerifyReport

    say = progress or (lambda message: None)
    output_dir = Path(output_dir)
    checkpoint = open_checkpoint(settings.checkpoint or DEFAULT_CHECKPOINT)
    calib = Path(settings.calib) if settings.calib else BUNDLED_TEXT / "calibration.txt"
    data = Path(settings.data) if settings.data else BUNDLED_TEXT / "evaluation.txt"
    refuse_overlap(output_dir, [checkpoint.path, *checkpoint.files, calib, data])
    recipe = with_calibration(load_recipe(settings.recipe), **({} if settings.calib else BUNDLED_CALIBRATION))
    recipe = with_calibration(recipe, samples=settings.samples, seq_len=settings.seq_len, seed=settings.seed)
    calibrates = recipe.needs_calibration or settings.calib is not None
    require_calibration_tokenizer(checkpoint, recipe)  # pre-flight: before anything is written or loaded
    if calibrates:
        check_calibration(checkpoint, recipe)
    target = load_target(settings.target)
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(output_dir, say)
    source_sha = checkpoint.content_hash()
    calib_sha = read_documents(calib)[1] if calibrates else None

    quantized_dir = output_dir / "quantized"
    quantize_record = stages.run(
        "quantize", _key(source=source_sha, recipe=recipe.to_dict(), calib=calib_sha,
                         numerics=target.activation_numerics.value), quantized_dir,
        lambda: _quantize(checkpoint, recipe, calib if calib_sha else None, quantized_dir, target, say),
        QuantizeStage)

    artifact_dir = output_dir / "artifact"
    export_record = stages.run(
        "export", _key(quantized=content_sha256(quantized_dir), target=target.to_dict(), max_seq_len=settings.max_seq_len),
        artifact_dir, lambda: _export(quantized_dir, target, artifact_dir, settings.max_seq_len, say), ExportStage)
    artifact_sha = content_sha256(artifact_dir)

    verify_path = output_dir / "verify.json"
    verify_record = stages.run(
        "verify", _key(artifact=artifact_sha, reference=source_sha, data=read_documents(data)[1],
                       seq_len=settings.eval_seq_len, windows=settings.eval_windows), verify_path,
        lambda: _verify(artifact_dir, checkpoint.path, data, settings, verify_path), VerifyReport)

    bench_path = output_dir / "bench.json"
    bench_record = stages.run(
        "bench", _key(artifact=artifact_sha, reference=source_sha, repetitions=settings.repetitions,
                      bandwidth_bytes=settings.bandwidth_bytes), bench_path,
        lambda: _bench(artifact_dir, checkpoint.path, settings, bench_path), BenchReport)

    report = build_report(
        source=ForgeSource(path=str(checkpoint.path), format=checkpoint.format, sha256=source_sha),
        recipe=decode(RecipeRecord, recipe.to_dict(), where="recipe"), target=target, stages=stages.timings,
        quantize=quantize_record, export=export_record, verify=verify_record, bench=bench_record)
    write_json_atomic(output_dir / "report.json", report.to_dict())
    write_html(report, output_dir / "report.html")
    say(f"[report] {output_dir / 'report.json'}, {output_dir / 'report.html'}")
    return ForgeResult(output_dir, report, stages.reused)


def _quantize(checkpoint, recipe, calib: Path | None, output: Path, target, say) -> QuantizeStage:
    from edgeforge.quantize import quantize_checkpoint
    from edgeforge.quantize.calibration import calibration_for

    calibration = calibration_for(checkpoint, recipe, calib) if calib is not None else None
    result = quantize_checkpoint(checkpoint, recipe, calibration=calibration, output_dir=output,
                                 numerics=target.activation_numerics, progress=say)
    from edgeforge.report import QuantizeStage

    record = result.record
    return QuantizeStage(seconds=round(result.seconds, 3), algorithm=recipe.algorithm, layers=record.layers,
                         fallbacks=record.fallbacks, calibration=record.calibration, plan=record.plan)


def _export(quantized_dir: Path, target, output: Path, max_seq_len: int | None, say) -> ExportStage:
    from edgeforge.export import export

    artifact = export(quantized_dir, target, output, max_seq_len=max_seq_len, progress=say)
    from edgeforge.report import ExportStage

    record = artifact.record
    return ExportStage(artifact=str(artifact.path), format=record.format, scheme=record.scheme,
                       model_file=record.report.model_file, report=record.report, guard=record.guard,
                       max_seq_len=record.max_seq_len)


def _verify(artifact_dir: Path, reference: Path, data: Path, settings: ForgeSettings, output: Path) -> VerifyReport:
    from edgeforge.verify.verify import VerifyOptions, verify

    report = verify(artifact_dir, reference, data, VerifyOptions(seq_len=settings.eval_seq_len,
                                                                 windows=settings.eval_windows))
    write_json_atomic(output, report.to_dict())
    return report


def _bench(artifact_dir: Path, reference: Path, settings: ForgeSettings, output: Path) -> BenchReport:
    from edgeforge.verify.bench import BenchSettings, bench

    options = BenchSettings(repetitions=settings.repetitions, bandwidth_bytes=settings.bandwidth_bytes)
    record = bench(artifact_dir, reference=reference, settings=options)
    write_json_atomic(output, record.to_dict())
    return record
