"""Prefill/decode speed, TTFT, load time and peak RSS of a SmolLM-135M-shaped Llama quantized to 8da4w,
as an exported artifact beside its fp32 eager reference (`edgeforge bench`), against the bandwidth ceiling.

The weights are random (benchmarks/make_llama_checkpoint.py): the numbers mean speed and memory only.
Unlike the bundled stories260K (1 MB of weights, served from cache, so its "share of the ceiling" is no
roofline), 135M reads about 90 MB per decoded token at 8da4w (about 540 MB in fp32), which is the regime
where decode is bound by memory bandwidth. Note that a VM may report a last-level cache larger than that
(this one's sysfs says 480 MiB); bench then says the weights "fit in cache" rather than calling it a roofline.

Steps (each skipped when its output exists; all under benchmarks/work/, which git ignores):

    python benchmarks/make_llama_checkpoint.py --preset 135m benchmarks/work/smol-135m-random
    edgeforge quantize benchmarks/work/smol-135m-random --recipe int4-xnnpack -o benchmarks/work/smol-135m-8da4w
    edgeforge export benchmarks/work/smol-135m-8da4w --target host --max-seq-len 512 \\
        -o benchmarks/work/smol-135m-8da4w.host
    edgeforge bench benchmarks/work/smol-135m-8da4w.host --reference benchmarks/work/smol-135m-random \\
        --json benchmarks/results/bench_135m.json

This script runs them in order:

    python benchmarks/bench_135m.py                              # .pte (target host), 5 repetitions
    python benchmarks/bench_135m.py --target onnx-cpu            # the ONNX artifact instead
    python benchmarks/bench_135m.py --eager -r 2 --prompt-lengths 16,64   # quick: the eager quantized checkpoint

Expect minutes: the fp32 reference decodes 135M parameters per token in eager PyTorch, and the default
bandwidth test touches 4x the last-level cache. On a shared machine read the IQR before the median.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="host", help="export target (default: host, an ExecuTorch .pte)")
    parser.add_argument("--eager", action="store_true", help="bench the eager quantized checkpoint, not an artifact")
    parser.add_argument("--prompt-lengths", default="16,64,256")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path, help="write the bench record here")
    args = parser.parse_args()

    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.export import export
    from edgeforge.fileio import write_json_atomic
    from edgeforge.quantize import load_recipe, quantize_checkpoint
    from edgeforge.verify.bench import BenchSettings, bench, format_bench

    fp32, quantized = WORK / "smol-135m-random", WORK / "smol-135m-8da4w"
    artifact = quantized if args.eager else WORK / f"smol-135m-8da4w.{args.target}"
    if not fp32.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_llama_checkpoint.py"), "--preset", "135m",
                        str(fp32)], check=True)
    if not quantized.exists():
        print(f"quantizing {fp32} -> {quantized} ...", file=sys.stderr)
        quantize_checkpoint(open_checkpoint(fp32), load_recipe("int4-xnnpack"), calibration=None, output_dir=quantized)
    if not artifact.exists():
        export(quantized, args.target, artifact, max_seq_len=512, progress=lambda m: print(m, file=sys.stderr))
    settings = BenchSettings.from_options(prompt_lengths=args.prompt_lengths, decode_tokens=args.decode_tokens,
                                          repetitions=args.repetitions, threads=args.threads)
    record = bench(artifact, reference=fp32, settings=settings, progress=lambda m: print(m, file=sys.stderr))
    print(format_bench(record))
    if args.json:
        write_json_atomic(args.json, record.to_dict())


if __name__ == "__main__":
    main()
