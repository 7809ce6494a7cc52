"""Wall time and peak memory of `edgeforge quantize` on a large checkpoint (Llama-3.2-1B shape).

Runs ``python -m edgeforge quantize CKPT --recipe R --calib TEXT ...`` as a child process, reads the
child's own peak RSS from wait4()'s rusage (so this script's memory is not counted), and reports it
against the checkpoint's size on disk: block-by-block quantization should peak at about 1.5x the
bf16 checkpoint or less. Each run is appended to benchmarks/results/quantize_1b.json.

    python benchmarks/make_llama_checkpoint.py benchmarks/work/llama-3.2-1b-random
    python benchmarks/quantize_1b.py benchmarks/work/llama-3.2-1b-random
    python benchmarks/quantize_1b.py benchmarks/work/smol-135m-random --samples 8 --seq-len 128   # quick check

Time includes interpreter start-up, checkpoint hashing and writing the output; the peak includes
the Python + torch baseline (about 0.3-0.4 GB), which dominates the ratio for small checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edgeforge.fileio import write_json_atomic  # light: no torch in this parent process

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINYSTORIES = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
RESULTS = REPO / "benchmarks" / "results" / "quantize_1b.json"
TARGET_RATIO = 1.5


def provenance() -> dict:
    """Versions, machine and time of the run (llama-bench style)."""
    import torch

    import edgeforge

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"edgeforge": edgeforge.__version__, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "load_average_1m": os.getloadavg()[0],
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def checkpoint_facts(path: Path) -> dict:
    """Size of the weight files on disk and a hash of config.json (the weights are too big to hash here)."""
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    config = path / "config.json" if path.is_dir() else path
    facts = {"path": str(path), "weights_bytes": sum(f.stat().st_size for f in weights), "weight_files": len(weights)}
    if path.is_dir() and config.exists():
        facts["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        facts["config"] = json.loads(config.read_text())
    return facts


def run_once(command: list[str], stdout_path: Path) -> tuple[float, int, int]:
    """Run the child; return (wall seconds, peak RSS bytes, exit status)."""
    with open(stdout_path, "wb") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout)  # stderr (progress) passes through
        _, status, usage = os.wait4(child.pid, 0)
        wall_s = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return wall_s, usage.ru_maxrss * 1024, child.returncode  # Linux reports ru_maxrss in KiB


def append_result(record: dict, path: Path) -> None:
    """Append to the JSON list at ``path`` (temp file + rename, so a crash never truncates it)."""
    records = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else []
    write_json_atomic(path, [*records, record])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} (n={len(values)})"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (see make_llama_checkpoint.py)")
    parser.add_argument("--recipe", default="int4-gptq", help="recipe name or TOML path (default: int4-gptq)")
    parser.add_argument("--calib", type=Path, default=TINYSTORIES, help="calibration text (default: TinyStories)")
    parser.add_argument("--no-calib", action="store_true", help="pass no calibration text (data-free recipes)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (default: 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default: 512)")
    parser.add_argument("--repeat", type=int, default=1, help="runs to time (default: 1; each is minutes on 1B)")
    parser.add_argument("-o", "--output", type=Path, help="quantized output directory (default: a temp dir, removed)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON list to append to (default: {RESULTS})")
    parser.add_argument("--no-append", action="store_true", help="do not append to the results file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write this run's record as JSON to FILE")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.checkpoint.exists():
        sys.exit(f"error: {args.checkpoint}: no such checkpoint (make one with benchmarks/make_llama_checkpoint.py)")
    facts = checkpoint_facts(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="edgeforge-quantize-1b-") as tmp:
        output = args.output or Path(tmp) / "quantized"
        child_json = Path(tmp) / "manifest.json"
        calibration = [] if args.no_calib else ["--calib", str(args.calib), "--samples", str(args.samples),
                                                "--seq-len", str(args.seq_len)]
        command = [sys.executable, "-m", "edgeforge", "quantize", str(args.checkpoint), "--recipe", args.recipe,
                   *calibration, "-o", str(output), "--json", str(child_json)]
        runs = []
        for index in range(args.repeat):
            stdout_path = Path(tmp) / f"stdout-{index}.txt"
            wall_s, peak_rss_bytes, status = run_once(command, stdout_path)
            if status != 0:
                print(f"error: edgeforge quantize exited with {status}:\n{stdout_path.read_text()}", file=sys.stderr)
                return 3
            runs.append({"wall_s": wall_s, "peak_rss_bytes": peak_rss_bytes})
            print(f"run {index + 1}/{args.repeat}: {wall_s:.1f} s, peak RSS {peak_rss_bytes / 1e9:.2f} GB",
                  file=sys.stderr)
        output_bytes = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
        manifest = json.loads(child_json.read_text()) if child_json.exists() else None
    peak = max(r["peak_rss_bytes"] for r in runs)
    ratio = peak / facts["weights_bytes"]
    record = {"benchmark": "quantize_1b", "command": command[1:], "recipe": args.recipe,
              "samples": None if args.no_calib else args.samples, "seq_len": None if args.no_calib else args.seq_len,
              "checkpoint": facts, "runs": runs, "peak_rss_bytes": peak,
              "peak_rss_to_checkpoint": ratio, "target_ratio": TARGET_RATIO, "within_target": ratio <= TARGET_RATIO,
              "output_bytes": output_bytes, "provenance": provenance(), "child_record": manifest}
    walls, size = [r["wall_s"] for r in runs], facts["weights_bytes"]
    print(f"checkpoint      {args.checkpoint} ({size / 1e9:.3f} GB in {facts['weight_files']} files)\n"
          f"recipe          {args.recipe}, calibration "
          f"{'none' if args.no_calib else f'{args.samples} x {args.seq_len} tokens from {args.calib.name}'}\n"
          f"wall time       {_mean_sd(walls)} s (child process: start-up, hashing, quantization, writing)\n"
          f"peak RSS        {peak / 1e9:.3f} GB (max over {len(runs)} run(s), child only)\n"
          f"peak / ckpt     {ratio:.2f} (target <= {TARGET_RATIO}: {'ok' if ratio <= TARGET_RATIO else 'OVER'})\n"
          f"output          {output_bytes / 1e9:.3f} GB ({output_bytes / size:.2f} of the checkpoint)")
    if not args.no_append:
        append_result(record, args.results)
        print(f"appended to {args.results}", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
