"""The farm: devices (reach each device of a farm file and say what it runs)."""

from __future__ import annotations

import click

from edgeforge.cli import main, _emit_json


@main.command()
@click.option("--farm", "farm_path", required=True, type=click.Path(path_type=str),
              help="The farm file: TOML with one [[device]] table per device.")
@click.option("--devices", "selector", metavar="EXPR",
              help="Only these: labels that must all match (os=linux,soc=sm8650), or a device name.")
@click.option("--strict", is_flag=True, help="Exit 3 when a device is unreachable or cannot be checked.")
@click.option("--json", "json_path", metavar="FILE", help="Write the record as JSON to FILE ('-' for stdout only).")
def devices(farm_path, selector, strict, json_path) -> None:
    """Check each device of a farm: reachable, its Python and edgeforge versions, the runtimes that import, its
    CPUs; a device that cannot be reached or checked is one NOT READY line, and the exit code is 0 unless
    --strict.

    Example: edgeforge devices --farm lab.toml --devices os=linux --json devices.json
    """
    from edgeforge.errors import RuntimeFailure
    from edgeforge.runners.farm import check_devices, load_farm

    farm = load_farm(farm_path)
    report = check_devices(farm, farm.select(selector))
    if json_path != "-":
        click.echo(format_devices(report))
    _emit_json(report.to_dict(), json_path)
    failed = [status.device.name for status in report.devices if not status.reachable]
    if strict and failed:
        raise RuntimeFailure(f"not reachable or not checked: {', '.join(failed)}", path=farm_path)


def format_devices(report) -> str:
    """One row per device; one that is not ready: its name, kind, labels and the problem."""
    header = ("device", "kind", "labels", "status", "python", "edgeforge", "cpus", "runtimes")
    rows = []
    for status in report.devices:
        device = status.device
        labels = ",".join(f"{key}={value}" for key, value in device.labels.items()) or "-"
        if not status.reachable:
            rows.append((device.name, device.kind, labels, f"NOT READY: {status.problem}"))
            continue
        runtimes = ", ".join(f"{format} {'ok' if problem is None else 'FAILS: ' + problem}"
                             for format, problem in status.runtimes.items())
        versions = ", ".join(f"{name} {version}" for name, version in status.versions.items() if version)
        rows.append((device.name, device.kind, labels, "ok", status.python or "-", status.edgeforge or "-",
                     str(status.cpus or "-"), f"{runtimes} ({versions})"))
    widths = [max(len(row[i]) for row in (header, *rows) if i < len(row) - 1) for i in range(len(header) - 1)]
    return "\n".join("  ".join([cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]).rstrip()
                     for row in (header, *rows))
