"""Every bundled decoder recipe on a real checkpoint, exported to every target that runs its scheme here,
guarded, and verified against the fp32 model on WikiText-2 (calibration and evaluation text disjoint).

Default checkpoint: the shared SmolLM2-135M-Instruct (build it once, about a minute):

    python ../shared/models/smollm2-135m/build.py benchmarks/work/smollm2
    python benchmarks/real_checkpoints.py                        # every recipe x target (hours on 2 cores)
    python benchmarks/real_checkpoints.py --recipes int8-dynamic,int4-xnnpack --targets host,onnx-cpu

WikiText-2's test file is split by lines: the first --calib-fraction (default 0.4) is the calibration text,
the rest the evaluation text, so no evaluated document was calibrated on (verify checks it again from the
artifact's calibration fingerprints). Each recipe is quantized once per target (calibration sees that
target's activation arithmetic), exported with the export guard on, then `edgeforge verify` measures the
artifact and its eager quantized checkpoint against fp32 on the same windows. Every step is skipped when
its output exists, so a rerun resumes; a failed step is recorded with its one-line error and the run goes
on. Results: benchmarks/results/real_checkpoints.json (one record per row) and a Markdown table on stdout
(the one in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WORK = REPO / "benchmarks" / "work" / "real"
DEFAULT_MODEL = REPO / "benchmarks" / "work" / "smollm2" / "hf"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = REPO / "benchmarks" / "results" / "real_checkpoints.json"


def split_wikitext(calib_fraction: float) -> tuple[Path, Path]:
    """Calibration and evaluation files from WikiText-2 test, split at an article boundary."""
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * calib_fraction)
    while cut < len(lines) and not (lines[cut].startswith(" = ") and not lines[cut].startswith(" = = ")):
        cut += 1  # the next top-level heading " = Title = " starts a new article
    WORK.mkdir(parents=True, exist_ok=True)
    calib, evaluation = WORK / "wiki-calib.txt", WORK / "wiki-eval.txt"
    calib.write_text("".join(lines[:cut]), encoding="utf-8")
    evaluation.write_text("".join(lines[cut:]), encoding="utf-8")
    return calib, evaluation


def edgeforge(*args, log: Path) -> tuple[bool, float, str]:
    """Run the CLI; (succeeded, seconds, its last stderr line) with stderr kept in ``log``."""
    start = time.perf_counter()
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-m", "edgeforge", *map(str, args)], stdout=subprocess.DEVNULL,
                              stderr=err, cwd=REPO)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return done.returncode == 0, time.perf_counter() - start, lines[-1] if lines else ""


def plan(recipes: list[str] | None, targets: list[str] | None) -> list[tuple[str, str]]:
    """(recipe, target) pairs: every decoder recipe with every target that lists its scheme and runs here."""
    from edgeforge.export.targets import list_targets, load_target
    from edgeforge.quantize import load_recipe
    from edgeforge.quantize.recipe import list_recipes
    from edgeforge.quantize.record import scheme_label

    pairs = []
    for recipe_name in recipes or sorted(list_recipes()):
        recipe = load_recipe(recipe_name)
        if recipe_name.startswith("embedding"):
            continue  # encoder recipes: not for a decoder
        scheme = scheme_label(recipe.weights.bits, recipe.activations.value)
        for target_name in targets or sorted(list_targets()):
            target = load_target(target_name)
            if target.runs_here and scheme in target.schemes:
                pairs.append((recipe_name, target_name))
    return pairs


def quantizing_target(recipe: str, target: str) -> str:
    """The target whose quantized checkpoint ``target`` reuses: the first (sorted) target with the same
    activation numerics, so targets that compute alike share one calibration (GPTQ: minutes each)."""
    from edgeforge.export.targets import list_targets, load_target

    numerics = load_target(target).activation_numerics
    return next(name for name in sorted(list_targets()) if load_target(name).activation_numerics == numerics
                and load_target(name).format == load_target(target).format)


def run_row(model: Path, recipe: str, target: str, calib: Path, evaluation: Path, args, *, label: str | None = None,
            quantize_args: tuple = ()) -> dict:
    """Quantize (for the target's numerics), export, verify: one row. ``label`` names the row's files (default:
    the recipe); ``quantize_args`` go to `edgeforge quantize` (e.g. a planner budget)."""
    label = label or recipe
    row = {"recipe": label, "target": target}
    numerics_target = quantizing_target(recipe, target)
    quantized = WORK / f"{label}.{numerics_target}.q"
    artifact, verify_json = WORK / f"{label}.{target}.artifact", WORK / f"{label}.{target}.verify.json"
    row["quantized"] = quantized.name
    if not quantized.exists():
        from edgeforge.quantize import load_recipe

        calibration = ("--calib", calib) if load_recipe(recipe).needs_calibration or quantize_args else ()
        ok, seconds, last = edgeforge("quantize", model, "--recipe", recipe, "--target", numerics_target,
                                      *calibration, *quantize_args, "-o", quantized,
                                      log=WORK / f"{label}.{numerics_target}.quantize.log")
        row["quantize_seconds"] = round(seconds, 1)
        if not ok:
            return {**row, "failed": "quantize", "error": last}
    if not artifact.exists():
        ok, seconds, last = edgeforge("export", quantized, "--target", target, "--max-seq-len", args.max_seq_len,
                                      "-o", artifact, log=WORK / f"{label}.{target}.export.log")
        if not ok:
            return {**row, "failed": "export", "error": last}
    manifest = json.loads((artifact / "edgeforge.json").read_text())
    report = manifest["report"]
    row.update(format=manifest["format"], scheme=manifest["scheme"], guard=manifest["guard"],
               size_bytes=report.get("size_bytes"), export_seconds=report.get("export_seconds"),
               export_peak_rss_bytes=report.get("peak_rss_bytes"))
    if not verify_json.exists():
        ok, seconds, last = edgeforge("verify", artifact, "--reference", model, "--data", evaluation,
                                      "--seq-len", args.seq_len, "--windows", args.windows, "--json", verify_json,
                                      log=WORK / f"{label}.{target}.verify.log")
        if not verify_json.exists():
            return {**row, "failed": "verify", "error": last}
    record = json.loads(verify_json.read_text())
    row.update(verdict=record["verdict"], verdict_line=record["verdict_line"], drift=record["drift"],
               eager=record["eager"],  # the artifact's eager source on the same windows, or null
               gates=record["gates"])
    return row


def table(rows: list[dict]) -> str:
    head = ("| recipe | target | scheme | guard | KLD ± sem (eager) | same top-1 (eager) | PPL ratio | size MB | "
            "export s | verdict |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['recipe']} | {row['target']} | | {row['failed']} failed: {row['error']} |||||||")
            continue
        d, e, guard = row["drift"], row.get("eager"), row.get("guard") or {}
        eager_kld = f" ({e['kld_mean_nats']:.4f})" if e else ""
        eager_top1 = f" ({e['top1_agreement']:.3f})" if e else ""
        guard_text = f"{guard.get('test', 'eager')} {'pass' if guard.get('passed') else 'FAIL'}" if guard else "not run"
        lines.append(f"| {row['recipe']} | {row['target']} | {row['scheme']} | {guard_text} | "
                     f"{d['kld_mean_nats']:.4f} ± {d['kld_mean_nats_sem']:.4f}{eager_kld} | "
                     f"{d['top1_agreement']:.3f}{eager_top1} | {d['ppl_ratio']:.4f} | "
                     f"{row['size_bytes'] / 1e6:.1f} | {row['export_seconds']:.0f} | {row['verdict']} |")
    return "\n".join(lines)


def add_row_options(parser: argparse.ArgumentParser) -> None:
    """The model and the settings :func:`run_row` reads: the split, the verify windows, the exported cache."""
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="fp32 HF Llama directory")
    parser.add_argument("--calib-fraction", type=float, default=0.4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help="comma-separated (default: every decoder recipe)")
    parser.add_argument("--targets", help="comma-separated (default: every target that runs here); the XNNPACK "
                        "targets for iOS and arm64 Linux lower to the same program as android-arm64-xnnpack")
    add_row_options(parser)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model}: no config.json; build the shared model first (see this script's docstring)")

    from edgeforge.fileio import write_json_atomic

    calib, evaluation = split_wikitext(args.calib_fraction)
    pairs = plan(args.recipes and args.recipes.split(","), args.targets and args.targets.split(","))
    rows = []
    for number, (recipe, target) in enumerate(pairs, 1):
        print(f"[{number}/{len(pairs)}] {recipe} -> {target}", file=sys.stderr, flush=True)
        rows.append(run_row(args.model, recipe, target, calib, evaluation, args))
        write_json_atomic(args.json, {"model": str(args.model), "data": str(WIKITEXT), "seq_len": args.seq_len,
                                      "windows": args.windows, "load_average_1m": os.getloadavg()[0], "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
