"""Export commands: export, targets."""

from __future__ import annotations

import json

import click

from edgeforge.cli import RegistryChoice, _emit_json, _progress, main


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=str))
@click.option("--target", "-t", required=True, help="Target profile name (see `edgeforge targets`) or a target TOML path.")
@click.option("--format", "format_", type=RegistryChoice("edgeforge.export.artifact:EXPORTERS"), help="Artifact format (must match the target's).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--max-seq-len", type=click.IntRange(1), help="KV-cache length of the exported decoder (default: min(context, 2048)).")
@click.option("--json", "json_path", metavar="FILE", help="Write the export report as JSON to FILE ('-' for stdout).")
def export(model, target, format_, output, max_seq_len, json_path) -> None:
    """Export a checkpoint (fp32) or an edgeforge quantized checkpoint for a target, and check it against eager.

    Example: edgeforge export llama-int4 --target android-arm64-xnnpack -o llama-int4.pte.d
    """
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT
    from edgeforge.export import export as run_export

    artifact = run_export(model or DEFAULT_CHECKPOINT, target, output, format=format_, max_seq_len=max_seq_len,
                          progress=_progress)
    record = artifact.record
    click.echo(format_export_summary(artifact.path, record))
    if record.report.size_warning:
        click.echo(f"edgeforge: warning: {record.report.size_warning}", err=True)
    _emit_json({"artifact": str(artifact.path), **record.to_dict()}, json_path)


def format_export_summary(path, record) -> str:
    """The export report of an ``ArtifactRecord`` as aligned lines."""
    from edgeforge.export.guard import describe as describe_guard

    report = record.report
    rows = [("artifact", f"{path / report.model_file} ({record.format}, {record.target.name}, {record.scheme})"),
            ("size", f"{report.size_bytes:,} bytes, {report.bytes_per_parameter:.3f} bytes/parameter "
                     f"({report.size_ratio_to_expected:.2f}x what {record.scheme} implies)")]
    if report.delegated_ops is not None:
        outside = ", ".join(f"{op} x{n}" for op, n in (report.ops_outside_delegate or {}).items()) or "none"
        rows.append(("delegated", f"{report.delegated_ops}/{report.total_ops} ops, "
                                  f"{report.delegated_parameter_share or 0:.1%} of parameters; outside: {outside}"))
    rows.append(("guard", describe_guard(record.guard)))
    rows.append(("export", f"{report.export_seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"))
    return "\n".join(f"{key:<10} {value}" for key, value in rows)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets(as_json: bool) -> None:
    """List the bundled device/backend target profiles."""
    from edgeforge.export.targets import list_targets, load_target

    loaded = [load_target(path) for path in list_targets().values()]
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in loaded], indent=2))
        return
    for target in loaded:
        click.echo(f"{target.name:<22} {target.format:<5} {target.backend:<8} {','.join(target.schemes):<30} "
                   f"{target.description}")
