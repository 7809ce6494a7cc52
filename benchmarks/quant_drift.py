"""Drift of each quantization recipe against the fp32 model, on held-out TinyStories text.

The TinyStories paragraphs are split in two: the first half is the calibration text, the second
half (disjoint) is the evaluation text. Each recipe quantizes stories260K with the same calibration
set; its eager quantized model is then compared with the fp32 model on the same evaluation windows
(llama-perplexity --kl-divergence statistics: KLD, top-1 agreement, PPL ratio, each ± its standard
error). KLD ratios to the RTN baseline show what calibration buys at the same bit width.

    python benchmarks/quant_drift.py
    python benchmarks/quant_drift.py --samples 32 --eval-windows 16 --json out/quant_drift.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
RTN_BASELINE = "int4-xnnpack"
RECIPES = ("int4-xnnpack", "int4-gptq", "int4-awq", "int4-awq-gptq", "int8-dynamic")


def provenance() -> dict:
    """Versions, machine and time of the run (llama-bench style)."""
    import torch

    import edgeforge

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"edgeforge": edgeforge.__version__, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0],
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def split_text(path: Path, calibration_file: Path) -> list[str]:
    """Write the first half of the paragraphs to ``calibration_file``; return the second half."""
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    half = len(paragraphs) // 2
    calibration_file.write_text("\n\n".join(paragraphs[:half]) + "\n", encoding="utf-8")
    return paragraphs[half:]


def evaluation_windows(paragraphs: list[str], tokenizer, *, seq_len: int, count: int):
    from edgeforge.verify.drift import token_windows

    ids: list[int] = []
    for paragraph in paragraphs:
        ids.extend(tokenizer.encode(paragraph))
        if len(ids) >= seq_len * count:
            break
    return token_windows(ids, seq_len, count)


def with_group_size(recipe, group_size: int | None):
    """The recipe with its 4-bit decoder weights at ``group_size`` (8-bit recipes are left alone)."""
    from edgeforge.quantize.scheme import WeightScheme

    if group_size is None or recipe.weights.bits != 4:
        return recipe
    weights = WeightScheme(bits=4, group_size=group_size, symmetric=recipe.weights.symmetric)
    return dataclasses.replace(recipe, weights=weights)


def run_recipe(name: str, checkpoint, reference, calibration, windows, *, group_size, work_dir: Path, log,
               verbose: bool) -> dict:
    from edgeforge.errors import ConfigError
    from edgeforge.quantize import load_quantized_model, load_recipe, quantize_checkpoint
    from edgeforge.verify.drift import compare_models

    try:
        recipe = with_group_size(load_recipe(name), group_size)
    except ConfigError as exc:  # UnknownNameError: recipe not bundled in this version
        log(f"skip {name}: {exc}")
        return {"recipe": name, "status": "missing", "reason": str(exc)}
    started = time.perf_counter()
    result = quantize_checkpoint(checkpoint, recipe, calibration=calibration if recipe.needs_calibration else None,
                                 output_dir=work_dir / name,
                                 progress=(lambda message: log(f"  {name}: {message}")) if verbose else None)
    quantize_s = time.perf_counter() - started
    started = time.perf_counter()
    drift = compare_models(reference, load_quantized_model(work_dir / name), windows)
    eval_s = time.perf_counter() - started
    log(f"{name}: quantized in {quantize_s:.1f} s, evaluated in {eval_s:.1f} s, kld_mean {drift.kld_mean:.5f}")
    return {"recipe": name, "status": "ok", "algorithm": recipe.algorithm, "weights": recipe.weights.to_dict(),
            "activations": recipe.activations.value, "calibrated": recipe.needs_calibration,
            "fallbacks": result.record.fallbacks, "quantize_s": quantize_s, "eval_s": eval_s,
            "drift": drift.to_dict()}


def render(record: dict) -> str:
    settings = record["settings"]
    fp32 = record["fp32"]
    lines = [(f"stories260K fp32 vs quantized: {settings['eval_windows']} x {settings['eval_seq_len']} held-out "
              f"TinyStories tokens, calibration {settings['samples']} x {settings['seq_len']} (seed "
              f"{settings['seed']}), int4 group size {settings['group_size'] or 'per recipe'}"),
             "fp32 PPL: no recipe ran" if fp32 is None else
             f"fp32 PPL {fp32['ppl']:.4f} ± {fp32['ppl_sem']:.4f} over {fp32['token_count']} scored tokens", ""]
    header = ("recipe", "algorithm", "KLD mean ± sem", "KLD p99", "top-1 ± sem", "PPL ratio ± sem", "KLD / RTN",
              "quant s", "eval s")
    rows = []
    for row in record["results"]:
        if row["status"] != "ok":
            rows.append((row["recipe"], "(missing)", *[""] * 7))
            continue
        d = row["drift"]
        ratio = row.get("kld_ratio_to_rtn")
        rows.append((row["recipe"], row["algorithm"], f"{d['kld_mean']:.5f} ± {d['kld_mean_sem']:.5f}",
                     f"{d['kld_p99']:.4f}", f"{d['top1_agreement']:.4f} ± {d['top1_agreement_sem']:.4f}",
                     f"{d['ppl_ratio']:.4f} ± {d['ppl_ratio_sem']:.4f}", "" if ratio is None else f"{ratio:.3f}",
                     f"{row['quantize_s']:.1f}", f"{row['eval_s']:.1f}"))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    lines += [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
    fallbacks = {row["recipe"]: row["fallbacks"] for row in record["results"] if row.get("fallbacks")}
    for name, notes in fallbacks.items():
        lines.append(f"{name}: {len(notes)} layer(s) fell back, e.g. {next(iter(notes))}: {next(iter(notes.values()))}")
    lines.append("KLD in nats/token; ± is the standard error of the mean; eval s includes loading the quantized "
                 "model; PPL is only comparable between runs with the same tokenizer and text.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (default: 128)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration sample length in tokens (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--eval-windows", type=int, default=64, help="evaluation windows (default: 64)")
    parser.add_argument("--eval-seq-len", type=int, default=256, help="evaluation window length (default: 256)")
    parser.add_argument("--group-size", type=int, default=32,
                        help="group size for the int4 recipes (default: 32; 0 keeps each recipe's own)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES),
                        help=f"recipes to run (default: {' '.join(RECIPES)})")
    parser.add_argument("--text", type=Path, default=TINYSTORIES,
                        help="text split into calibration / evaluation halves")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the record as JSON to FILE")
    parser.add_argument("--verbose", action="store_true", help="print the quantizer's per-layer progress to stderr")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT, load_model, open_checkpoint
    from edgeforge.fileio import write_json_atomic
    from edgeforge.quantize.calibration import build_calibration

    log = lambda message: print(message, file=sys.stderr, flush=True)
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    reference = load_model(checkpoint)
    group_size = args.group_size or None
    with tempfile.TemporaryDirectory(prefix="edgeforge-quant-drift-") as tmp:
        work_dir = Path(tmp)
        calibration_text = work_dir / "calibration.txt"
        evaluation = split_text(args.text, calibration_text)
        windows = evaluation_windows(evaluation, checkpoint.tokenizer, seq_len=args.eval_seq_len,
                                     count=args.eval_windows)
        calibration = build_calibration(calibration_text, checkpoint.tokenizer, samples=args.samples,
                                        seq_len=args.seq_len, seed=args.seed)
        results = [run_recipe(name, checkpoint, reference, calibration, windows, group_size=group_size,
                              work_dir=work_dir, log=log, verbose=args.verbose) for name in args.recipes]
    ok = [r for r in results if r["status"] == "ok"]
    fp32 = None if not ok else {"token_count": ok[0]["drift"]["token_count"],  # same windows for every recipe
                                "ppl": ok[0]["drift"]["ppl_ref"], "ppl_sem": ok[0]["drift"]["ppl_ref_sem"]}
    rtn = next((r for r in results if r["recipe"] == RTN_BASELINE and r["status"] == "ok"), None)
    for row in results:
        if rtn and row["status"] == "ok" and row["weights"]["bits"] == 4 and rtn["drift"]["kld_mean"] > 0:
            row["kld_ratio_to_rtn"] = row["drift"]["kld_mean"] / rtn["drift"]["kld_mean"]
    record = {"benchmark": "quant_drift", "checkpoint": str(DEFAULT_CHECKPOINT), "text": str(args.text),
              "settings": {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                           "eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len,
                           "group_size": group_size, "calibration_sha256": calibration.sha256},
              "provenance": provenance(), "fp32": fp32, "results": results}
    print(render(record))
    if args.json:
        write_json_atomic(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
