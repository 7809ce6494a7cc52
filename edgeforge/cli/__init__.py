"""The `edgeforge` command: parse, call the Python API, print. Heavy imports stay inside commands.

The group and its shared helpers live here; each module beside it adds one family of commands.
"""

from __future__ import annotations

import json

import click

from edgeforge import __version__
from edgeforge.errors import EdgeforgeError
from edgeforge.quiet import third_party_quiet


class _Group(click.Group):
    """Runs a command with third-party noise off stderr and turns edgeforge's typed errors into one line on
    stderr and their exit code (with --debug: third-party output and the traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            with third_party_quiet(enabled=not ctx.params.get("debug")):
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except EdgeforgeError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"edgeforge: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("edgeforge: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"edgeforge: internal error: {type(exc).__name__}: {first_line} "
                       f"(rerun with --debug for the traceback)", err=True)
            ctx.exit(70)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeforge")
@click.option("--debug", is_flag=True, help="Show third-party warnings and logs, and the full traceback on errors.")
def main(debug: bool) -> None:
    """Quantize, export and verify Llama and sentence-embedding models for devices.

    Every command that takes a CHECKPOINT runs on the bundled stories260K model when it is omitted.
    """


class RegistryChoice(click.Choice):
    """A choice among a registry's names (edgeforge.registry), read when the option is parsed or shown, so an
    entry point installed after import counts. ``registry`` is the Registry, or ``"module:NAME"`` naming one in
    a module imported only then (it may import torch, which ``edgeforge --help`` must not)."""

    def __init__(self, registry):
        self.registry, self.case_sensitive = registry, True

    @property
    def choices(self) -> tuple[str, ...]:
        registry = self.registry
        if isinstance(registry, str):
            import importlib

            module, name = registry.split(":")
            registry = getattr(importlib.import_module(module), name)
        return tuple(registry.names())


def _checkpoint_argument():
    return click.argument("checkpoint", required=False, type=click.Path(path_type=str))


def _open(checkpoint: str | None, format: str | None = None):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint

    return open_checkpoint(checkpoint or DEFAULT_CHECKPOINT, format)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _emit_json(record: dict, destination: str | None) -> None:
    if destination == "-":
        click.echo(json.dumps(record, indent=2))
    elif destination:
        from edgeforge.fileio import write_json_atomic

        write_json_atomic(destination, record)


from edgeforge.cli import devices, export, forge, models, quantize, verify  # noqa: E402,F401  (register commands)
