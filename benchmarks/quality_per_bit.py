"""Quality per bit in one run: edgeforge's techniques measured on their exported artifacts (.pte and ONNX) beside
llama.cpp's Q8_0, Q4_0, Q4_K_M and Q4_K_M with an importance matrix, every row scored by edgeforge's verify
statistics against the same fp32 reference on the same WikiText-2 windows.

    python ../shared/models/smollm2-135m/build.py benchmarks/work/smollm2    # the shared SmolLM2-135M, once
    bash benchmarks/peers/setup.sh llamacpp                                 # llama.cpp's rows (about 10 min)
    python benchmarks/quality_per_bit.py                                    # every row (hours on 2 cores)
    python benchmarks/quality_per_bit.py --rows int4-rotated-gptq@host --no-llamacpp

Rows: ``RECIPE@TARGET`` (a bundled recipe exported for a target: host is the .pte, onnx-cpu the ONNX model) and
``plan:BITS:RECIPE@TARGET`` (`edgeforge quantize --budget-bits BITS` on that base recipe, then the same export
and verify). Each is benchmarks/real_checkpoints.py's row (quantize with the target's numerics, export with the
guard on, verify the artifact and its eager source), so the files under benchmarks/work/real are shared with it
and every step whose output exists is skipped: a rerun resumes. llama.cpp's rows are
benchmarks/llamacpp_rows.py's accuracy part (the importance matrix from the same calibration text). Bits per
weight count what each artifact stores for the block linears, scales and zero points included (edgeforge's as
its runtime holds them: bf16 group scales in a .pte, float32 in MatMulNBits); head and embedding apart.
Results: benchmarks/results/quality_per_bit.json and a Markdown table on stdout (the one in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llamacpp_rows
import real_checkpoints
from quant_drift import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality_per_bit.json"
DEFAULT_ROWS = ("int4-xnnpack@host", "int4-xnnpack@onnx-cpu", "int4-gptq@host", "int4-gptq@onnx-cpu",
                "int4-awq-gptq@host", "int4-awq-gptq@onnx-cpu", "int4-rotated-gptq@host",
                "int4-rotated-gptq@onnx-cpu", "int4-rotated-gptq-g64@onnx-cpu", "int8-dynamic@host", "int8-dynamic-rotated@host",
                "int8-dynamic-rotated@onnx-cpu", "int8-weight-only-rotated@onnx-cpu", "plan:5.5:int4-awq-gptq@host")


def edgeforge_row(spec: str, model: Path, calib: Path, evaluation: Path, args) -> dict:
    """One ``RECIPE@TARGET`` or ``plan:BITS:RECIPE@TARGET`` row, with the bits its artifact stores."""
    recipe, target = spec.rsplit("@", 1)
    quantize_args, label = (), None
    if recipe.startswith("plan:"):
        _, bits, recipe = recipe.split(":", 2)
        quantize_args, label = ("--budget-bits", bits), f"plan-{bits}-{recipe}"
    row = real_checkpoints.run_row(model, recipe, target, calib, evaluation, args, label=label,
                                   quantize_args=quantize_args)
    row["technique"] = spec
    if "failed" not in row:
        row["storage"] = artifact_storage(real_checkpoints.WORK / f"{label or recipe}.{target}.artifact")
    return row


def artifact_storage(artifact: Path) -> dict:
    """Bits per weight the artifact stores: block linears (its record's figure), the head (a linear) and the
    embedding table (int8 rows with a float32 scale each, in both runtimes)."""
    from edgeforge.export import open_artifact
    from edgeforge.quantize import read_quantized
    from edgeforge.quantize.scheme import ActivationScheme

    record = open_artifact(artifact).record
    quantized = read_quantized(record.source.path)
    numerics = record.target.activation_numerics
    parts = {"block_linears": record.source.bits_per_weight}
    config = record.model_config()
    for name in ("output", "tok_embeddings"):
        layer = quantized.layers.get(name)
        if layer is not None:  # the head is a linear as the runtime stores it, the table as the checkpoint does
            shape, scheme = (config.vocab_size, config.dim), layer.weight_scheme
            stored = (numerics.stored_bytes(scheme, shape, ActivationScheme.from_name(layer.activations))
                      if name == "output" else scheme.stored_bytes(*shape))
            parts[name] = 8 * stored / (config.vocab_size * config.dim)
    return parts


def llamacpp_part(model: Path, args) -> dict:
    """llama.cpp's accuracy rows, or why there are none."""
    if not (llamacpp_rows.VENV / ".edgeforge-peer-ready").exists():
        return {"missing": f"{llamacpp_rows.VENV} is not set up: bash benchmarks/peers/setup.sh llamacpp"}
    options = argparse.Namespace(data=args.evaluation, calib=args.calib, seq_len=args.seq_len, windows=args.windows,
                                 imatrix_ctx=512, imatrix_chunks=128, threads=2, quants=None)
    return llamacpp_rows.accuracy(model, llamacpp_rows.DEFAULT_OUT, options)


def table(record: dict) -> str:
    lines = ["| technique | format | bpw block linears | head / embedding bits | file MB | KLD ± sem | same top-1 | "
             "PPL ratio |", "|---|---|---|---|---|---|---|---|"]
    for row in record["edgeforge"]:
        if "failed" in row:
            lines.append(f"| {row['technique']} | | {row['failed']} failed: {row['error']} ||||||")
            continue
        d, parts = row["drift"], row["storage"]
        head = f"{parts.get('output', 32):.2f} / {parts.get('tok_embeddings', 32):.2f}"
        lines.append(f"| edgeforge {row['technique']} | {row['format']} | {parts['block_linears']:.3f} | {head} | "
                     f"{row['size_bytes'] / 1e6:.1f} | {d['kld_mean_nats']:.4f} ± {d['kld_mean_nats_sem']:.4f} | "
                     f"{d['top1_agreement']:.3f} | {d['ppl_ratio']:.4f} |")
    llamacpp = record["llamacpp"]
    if "missing" in llamacpp:
        lines.append(f"| llama.cpp | gguf | not run: {llamacpp['missing']} ||||||")
    for row in llamacpp.get("rows", []):
        parts, d = row["storage"]["parts"], row["drift"]
        embedding = parts["token_embd"]["bits_per_weight"]
        lines.append(f"| llama.cpp {row['quant']} | gguf | {parts['block_linears']['bits_per_weight']:.3f} | "
                     f"{embedding:.2f} (tied) | {row['storage']['file_bytes'] / 1e6:.1f} | "
                     f"{d['kld_mean_nats']:.4f} ± {d['kld_mean_nats_sem']:.4f} | {d['top1_agreement']:.3f} | "
                     f"{d['ppl_ratio']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_checkpoints.add_row_options(parser)
    parser.add_argument("--rows", type=lambda s: s.split(","), default=list(DEFAULT_ROWS),
                        help="comma-separated RECIPE@TARGET or plan:BITS:RECIPE@TARGET")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's rows")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model}: no config.json; build the shared model first (see benchmarks/real_checkpoints.py)")
    args.calib, args.evaluation = real_checkpoints.split_wikitext(args.calib_fraction)

    from edgeforge.fileio import write_json_atomic

    rows = []
    for number, spec in enumerate(args.rows, 1):
        print(f"[{number}/{len(args.rows)}] {spec}", file=sys.stderr, flush=True)
        rows.append(edgeforge_row(spec, args.model, args.calib, args.evaluation, args))
    record = {"benchmark": "quality_per_bit", "model": str(args.model), "calibration": str(args.calib),
              "evaluation": str(args.evaluation), "windows": args.windows, "seq_len": args.seq_len,
              "provenance": provenance(), "edgeforge": rows,
              "llamacpp": {"missing": "left out (--no-llamacpp)"} if args.no_llamacpp else llamacpp_part(args.model,
                                                                                                        args)}
    write_json_atomic(args.json, record)
    print(table(record))


if __name__ == "__main__":
    main()
