"""The one-command pipeline: forge."""

from __future__ import annotations

import click

from edgeforge.cli import main, _checkpoint_argument, _progress
from edgeforge.pipeline import BUNDLED_CALIBRATION, ForgeSettings

DEFAULTS = ForgeSettings()  # the defaults live there; the help shows them


@main.command()
@_checkpoint_argument()
@click.option("--recipe", "-r", help=f"Recipe name or TOML path (default: {DEFAULTS.recipe}).")
@click.option("--target", "-t", help=f"Target profile name or TOML path (default: {DEFAULTS.target}).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Forge directory (reruns resume in it).")
@click.option("--calib", type=click.Path(path_type=str), help="Calibration text (default: bundled TinyStories sample).")
@click.option("--data", type=click.Path(path_type=str), help="Evaluation text (default: bundled TinyStories sample, disjoint).")
@click.option("--samples", type=click.IntRange(1), help="Calibration samples (default: the recipe's; "
                                                       f"{BUNDLED_CALIBRATION['samples']} on the bundled text).")
@click.option("--seq-len", type=click.IntRange(2), help="Tokens per calibration sample (default: the recipe's; "
                                                       f"{BUNDLED_CALIBRATION['seq_len']} on the bundled text).")
@click.option("--max-seq-len", type=click.IntRange(1), help="KV-cache length of the exported decoder.")
@click.option("--eval-windows", type=click.IntRange(1),
              help=f"Evaluation windows for verify (default: {DEFAULTS.eval_windows}).")
@click.option("--eval-seq-len", type=click.IntRange(2),
              help=f"Tokens per evaluation window (default: {DEFAULTS.eval_seq_len}).")
@click.option("--repetitions", type=click.IntRange(1), help=f"Timed repetitions in bench (default: {DEFAULTS.repetitions}).")
def forge(checkpoint, recipe, target, output, calib, data, samples, seq_len, max_seq_len, eval_windows, eval_seq_len,
          repetitions) -> None:
    """Quantize -> export -> verify -> bench -> report in one command; unchanged stages are reused on a rerun.

    Example: edgeforge forge --recipe int4-gptq --target host -o forge-out
    """
    from edgeforge.pipeline import forge as run_forge

    given = {"recipe": recipe, "target": target, "checkpoint": checkpoint, "calib": calib, "data": data,
             "samples": samples, "seq_len": seq_len, "max_seq_len": max_seq_len, "eval_seq_len": eval_seq_len,
             "eval_windows": eval_windows, "repetitions": repetitions}
    settings = ForgeSettings(**{key: value for key, value in given.items() if value is not None})
    result = run_forge(settings, output, progress=_progress)
    click.echo(format_forge_summary(result))
    verify = result.report.verify
    if verify is not None:
        verify.raise_for_gates()


def format_forge_summary(result) -> str:
    """The headline figures of a forge run."""
    report = result.report
    export, verify, bench = report.export, report.verify, report.bench
    lines = [f"artifact  {export.artifact} ({export.format}, {export.scheme}, {export.report.size_bytes:,} bytes)"]
    drift = verify.drift if verify else None
    if drift:
        lines.append(f"drift     ppl {drift.ppl_ref:.3f} -> {drift.ppl_test:.3f} (x{drift.ppl_ratio:.4f}), "
                     f"KLD {drift.kld_mean_nats:.5f} ± {drift.kld_mean_nats_sem:.5f}, "
                     f"same top token {drift.top1_agreement:.2%}")
    for model in bench.models if bench else []:
        decode = model.decode_test
        lines.append(f"decode    {model.role:<9} {decode.tok_s.median:.1f} tok/s "
                     f"(median ± IQR {decode.tok_s.iqr:.1f}, n={decode.tok_s.n})")
    lines.append(f"verdict   {verify.verdict_line if verify else 'not run'}")
    lines.append(f"report    {result.output_dir / 'report.html'}"
                 + (f" (reused: {', '.join(result.reused)})" if result.reused else ""))
    return "\n".join(lines)
