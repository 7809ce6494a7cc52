"""The export guard on a real model: artifact against eager, with the target's numerics and with the other's.

Quantizes the shared SmolLM2-135M-Instruct (``benchmarks/work/smollm2/hf``, built by
``../shared/models/smollm2-135m/build.py``) with a data-free recipe (default ``int4-xnnpack``) once per
target (``--target host`` and ``onnx-cpu``: the integers are the same, the manifest records the target's
numerics), exports each without the guard, then runs the guard's comparison (its fixed sequence, prefill
then single-token decode through both KV caches) against the eager model computing

- as the target's runtime does (``faithful``: what export's guard now checks), and
- as the other runtime does (``other``: an oracle with different activation rounding, which is what the
  guard compared against before the eager model followed the target).

    python benchmarks/numerics_guard.py --json benchmarks/results/numerics_guard.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SMOLLM2 = Path(__file__).resolve().parent / "work" / "smollm2" / "hf"
TARGETS = ("host", "onnx-cpu")


def guard_numbers(artifact, model, numerics, *, max_seq_len: int) -> dict:
    """The guard's statistics for ``artifact`` against ``model`` computing with ``numerics``."""
    from edgeforge.export.guard import compare_logits, decode_logits, fixed_sequence
    from edgeforge.quantize.modules import set_activation_numerics

    set_activation_numerics(model, numerics)
    prefill = min(64, max_seq_len // 2)
    tokens = fixed_sequence(model.config.vocab_size, min(prefill + 32, max_seq_len))
    model.setup_cache(1, max_seq_len)
    started = time.perf_counter()
    reference = decode_logits(model, tokens, prefill)
    candidate = decode_logits(artifact.open().forward, tokens, prefill)
    report = compare_logits(reference, candidate, artifact.record.scheme)
    return {"numerics": numerics.value, **report.to_dict(), "seconds": round(time.perf_counter() - started, 1)}


def run(checkpoint: Path, recipe_name: str, targets: list[str], max_seq_len: int, work: Path) -> dict:
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.export import export, load_target
    from edgeforge.quantize import load_quantized_model, load_recipe, quantize_checkpoint
    from edgeforge.quantize.activations import ActivationNumerics

    source, recipe = open_checkpoint(checkpoint), load_recipe(recipe_name)
    if recipe.needs_calibration:
        raise SystemExit(f"recipe {recipe_name} calibrates on text; this benchmark takes a data-free one")
    results = {}
    for name in targets:
        target = load_target(name)
        other = next(n for n in ActivationNumerics if n is not target.activation_numerics)
        say(f"[{name}] quantizing {checkpoint.name} with {recipe_name} ({target.activation_numerics.value}) ...")
        started = time.perf_counter()
        quantized = work / f"{name}-quantized"
        quantize_checkpoint(source, recipe, calibration=None, output_dir=quantized,
                            numerics=target.activation_numerics)
        quantize_seconds = time.perf_counter() - started
        say(f"[{name}] exporting ...")
        started = time.perf_counter()
        artifact = export(quantized, target, work / f"{name}-artifact", max_seq_len=max_seq_len, check=False)
        export_seconds = time.perf_counter() - started
        model = load_quantized_model(quantized)
        results[name] = {"quantize_seconds": round(quantize_seconds, 1), "export_seconds": round(export_seconds, 1),
                         "faithful": guard_numbers(artifact, model, target.activation_numerics,
                                                   max_seq_len=max_seq_len),
                         "other": guard_numbers(artifact, model, other, max_seq_len=max_seq_len)}
        say(f"[{name}] {json.dumps(results[name])}")
    return results


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(results: dict) -> str:
    rows = [f"{'target':<10} {'oracle numerics':<18} {'min cosine':>10} {'top-1':>6} {'positions':>9}"]
    for target, result in results.items():
        for key in ("faithful", "other"):
            guard = result[key]
            rows.append(f"{target:<10} {guard['numerics'] + (' *' if key == 'faithful' else ''):<18} "
                        f"{guard['min_cosine']:>10.4f} {guard['top1_agreement']:>6.3f} {guard['positions']:>9}")
    rows.append("* the target's own numerics: what export's guard compares against")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=SMOLLM2)
    parser.add_argument("--recipe", default="int4-xnnpack")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the record as JSON to this file")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"{args.checkpoint}: no checkpoint; build it with ../shared/models/smollm2-135m/build.py")
    from edgeforge.verify.verify import provenance

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent / "work") as work:
        results = run(args.checkpoint, args.recipe, args.targets, args.max_seq_len, Path(work))
    record = {"checkpoint": str(args.checkpoint), "recipe": args.recipe, "max_seq_len": args.max_seq_len,
              "results": results, "seconds": round(time.perf_counter() - started, 1),
              "provenance": {**provenance("pte"), **provenance("onnx"),
                             "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
