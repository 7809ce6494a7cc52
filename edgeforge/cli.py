"""The `edgeforge` command: parse, call the Python API, print. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys

import click

from edgeforge import __version__
from edgeforge.errors import EdgeforgeError


class _Group(click.Group):
    """Turns edgeforge's typed errors into one line on stderr and their exit code (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
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
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main(debug: bool) -> None:
    """Quantize, export and verify Llama and sentence-embedding models for devices.

    Every command that takes a CHECKPOINT runs on the bundled stories260K model when it is omitted.
    """


def _checkpoint_argument():
    return click.argument("checkpoint", required=False, type=click.Path(path_type=str))


def _open(checkpoint: str | None, format: str | None = None):
    import edgeforge.quantize  # noqa: F401  (registers the quantized-checkpoint format)
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


@main.command()
@_checkpoint_argument()
@click.option("--format", "format_", help="Force a checkpoint format (hf, meta, llama2c, gguf) instead of detecting it.")
@click.option("--json", "json_path", metavar="FILE", help="Also write the record as JSON to FILE ('-' for stdout only).")
def inspect(checkpoint: str | None, format_: str | None, json_path: str | None) -> None:
    """Describe a checkpoint: format, architecture, parameters, dtypes, size, tokenizer, quantization.

    Example: edgeforge inspect ./Llama-3.2-1B --json info.json
    """
    from edgeforge.checkpoints.summary import format_summary, summarize

    record = summarize(_open(checkpoint, format_))
    if json_path != "-":
        click.echo(format_summary(record))
    _emit_json(record, json_path)


@main.command()
@_checkpoint_argument()
@click.option("--prompt", "-p", default="", show_default=True, help="Text to continue (empty: start from BOS).")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="0 for greedy decoding, above 0 to sample.")
@click.option("--seed", type=int, help="Seed for sampling.")
def generate(checkpoint: str | None, prompt: str, max_new_tokens: int, temperature: float, seed: int | None) -> None:
    """Generate text with the fp32 reference model (a sanity check of a checkpoint and its tokenizer).

    Example: edgeforge generate --prompt "Once upon a time" -n 50
    """
    import time

    from edgeforge.checkpoints import load_model
    from edgeforge.errors import InputError
    from edgeforge.generate import generate as run_generation

    ckpt = _open(checkpoint)
    if ckpt.architecture != "llama":
        raise InputError(f"generate needs a decoder; this is a {ckpt.architecture} encoder", path=ckpt.path)
    if ckpt.tokenizer is None:
        raise InputError("missing tokenizer (tokenizer.json, tokenizer.model or tok*.bin beside the weights)",
                         path=ckpt.path)
    tokenizer, model = ckpt.tokenizer, load_model(ckpt)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    shown = ""
    new_ids: list[int] = []

    def stream(token: int) -> None:
        nonlocal shown
        new_ids.append(token)
        text = tokenizer.decode(prompt_ids + new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            click.echo(text[len(shown):], nl=False)
            shown = text

    shown = tokenizer.decode(prompt_ids)
    click.echo(shown, nl=False)
    start = time.perf_counter()
    run_generation(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   eos_id=tokenizer.eos_id, on_token=stream)
    elapsed = time.perf_counter() - start
    click.echo()
    click.echo(f"{len(new_ids)} tokens in {elapsed:.2f} s ({len(new_ids) / elapsed:.1f} tok/s, prompt "
               f"{len(prompt_ids)} tokens, fp32 eager)", err=True)


@main.command()
@_checkpoint_argument()
@click.option("--recipe", "-r", required=True, help="Recipe name (see `edgeforge recipes`) or path to a recipe TOML.")
@click.option("--calib", type=click.Path(path_type=str),
              help="Calibration text: a .txt file (blank-line separated), a .jsonl with a 'text' field, or a folder of .txt.")
@click.option("--samples", type=click.IntRange(1), help="Calibration samples (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(2), help="Tokens per calibration sample (default: the recipe's).")
@click.option("--seed", type=int, help="Seed for drawing calibration samples (default: the recipe's).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Quantized checkpoint directory to write.")
@click.option("--json", "json_path", metavar="FILE", help="Write the manifest and timing as JSON to FILE ('-' for stdout).")
def quantize(checkpoint, recipe, calib, samples, seq_len, seed, output, json_path) -> None:
    """Quantize a checkpoint with a recipe and calibration text, block by block.

    Example: edgeforge quantize ./Llama-3.2-1B --recipe int4-gptq --calib wiki.txt -o llama-int4
    """
    from dataclasses import replace

    from edgeforge.quantize import load_recipe, quantize_checkpoint
    from edgeforge.quantize.calibration import build_calibration

    ckpt = _open(checkpoint)
    chosen = load_recipe(recipe)
    settings = replace(chosen.calibration, **{k: v for k, v in
                                              {"samples": samples, "seq_len": seq_len, "seed": seed}.items()
                                              if v is not None})
    chosen = replace(chosen, calibration=settings)
    calibration = None
    if calib:
        if ckpt.tokenizer is None:
            from edgeforge.errors import InputError

            raise InputError("missing tokenizer: calibration text cannot be tokenized", path=ckpt.path)
        if settings.seq_len > getattr(ckpt.config, "max_seq_len", settings.seq_len):
            from edgeforge.errors import ConfigError

            raise ConfigError(f"--seq-len {settings.seq_len} exceeds the model's context {ckpt.config.max_seq_len}")
        calibration = build_calibration(calib, ckpt.tokenizer, samples=settings.samples, seq_len=settings.seq_len,
                                        seed=settings.seed)
    result = quantize_checkpoint(ckpt, chosen, calibration=calibration, output_dir=output, progress=_progress)
    click.echo(format_quantize_summary(result))
    _emit_json({"output_dir": str(result.output_dir), "seconds": round(result.seconds, 3), **result.manifest},
               json_path)


def format_quantize_summary(result) -> str:
    """Per-layer sensitivity table plus totals."""
    manifest = result.manifest
    rows = [f"{'layer':<28} {'scheme':<14} {'rel.err':>8} {'rtn':>8} {'sqnr dB':>8}"]
    for name, layer in manifest["layers"].items():
        scheme = layer["scheme"]
        label = f"int{scheme['bits']} " + (f"g{scheme['group_size']}" if scheme["group_size"] else "per-ch")
        if not scheme["symmetric"]:
            label += " asym"
        err, rtn = layer.get("rel_error"), layer.get("rel_error_rtn")
        sqnr = layer.get("output_sqnr_db", layer.get("weight_sqnr_db"))
        rows.append(f"{name:<28} {label:<14} {_num(err):>8} {_num(rtn):>8} {_num(sqnr, '.1f'):>8}")
    recipe = manifest["recipe"]
    rows.append(f"recipe {recipe['name']} ({recipe['algorithm']}, activations {recipe['activations']}), "
                f"{len(manifest['fallbacks'])} fallback(s), {result.seconds:.1f} s -> {result.output_dir}")
    return "\n".join(rows)


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def recipes(as_json: bool) -> None:
    """List the bundled quantization recipes."""
    from edgeforge.quantize import list_recipes, load_recipe

    loaded = [load_recipe(path) for path in list_recipes().values()]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in loaded], indent=2))
        return
    for recipe in loaded:
        weights = recipe.weights
        scheme = f"w{weights.bits}" + (f" g{weights.group_size}" if weights.group_size else " per-ch")
        click.echo(f"{recipe.name:<16} {recipe.algorithm:<12} {scheme:<10} act {recipe.activations.value:<13} "
                   f"{recipe.description}")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=str))
@click.option("--target", "-t", required=True, help="Target profile name (see `edgeforge targets`) or a target TOML path.")
@click.option("--format", "format_", type=click.Choice(["pte", "onnx"]), help="Artifact format (must match the target's).")
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
    manifest = artifact.manifest
    report = manifest["report"]
    click.echo(format_export_summary(artifact.path, manifest))
    if "size_warning" in report:
        click.echo(f"edgeforge: warning: {report['size_warning']}", err=True)
    _emit_json({"artifact": str(artifact.path), **manifest}, json_path)


def format_export_summary(path, manifest: dict) -> str:
    """The export report as aligned lines."""
    report, guard = manifest["report"], manifest["guard"]
    rows = [("artifact", f"{path / report['model_file']} ({manifest['format']}, {manifest['target']['name']}, "
                         f"{manifest['scheme']})"),
            ("size", f"{report['size_bytes']:,} bytes, {report['bytes_per_parameter']:.3f} bytes/parameter "
                     f"({report['size_ratio_to_expected']:.2f}x what {manifest['scheme']} implies)")]
    if "delegated_ops" in report:
        outside = ", ".join(f"{op} x{n}" for op, n in report.get("ops_outside_delegate", {}).items()) or "none"
        rows.append(("delegated", f"{report['delegated_ops']}/{report['total_ops']} ops, "
                                  f"{report.get('delegated_parameter_share', 0):.1%} of parameters; outside: {outside}"))
    rows.append(("guard", "not run: the target does not execute on this machine" if guard is None else
                 f"passed: min cosine {guard['min_cosine']:.5f}, top-1 {guard['top1_agreement']:.3f} over "
                 f"{guard['positions']} positions"))
    rows.append(("export", f"{report['export_seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"))
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


@main.command()
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--reference", required=True, type=click.Path(path_type=str), help="The full-precision checkpoint to compare with.")
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Evaluation text: a .txt file (blank-line separated), a .jsonl with a 'text' field, or a folder of .txt.")
@click.option("--seq-len", type=click.IntRange(2), help="Tokens per window (encoders: per sentence); default min(512, context).")
@click.option("--windows", type=click.IntRange(1), help="Windows to evaluate (decoders; default 32).")
@click.option("--sentences", type=click.IntRange(3), help="Sentences to embed (encoders; default 256).")
@click.option("--top-k", type=click.IntRange(1), help="Reference log-probs cached per token (decoders; default 128).")
@click.option("--cache-dir", type=click.Path(path_type=str), help="Reference cache folder (default $EDGEFORGE_CACHE/reference or ~/.cache/edgeforge/reference).")
@click.option("--no-cache", is_flag=True, help="Compute the reference without reading or writing the cache.")
@click.option("--max-kld", type=float, help="Gate: mean KLD (nats/token) at most this (default: the recipe's).")
@click.option("--min-top1", type=float, help="Gate: top-1 agreement at least this, 0..1 (default: the recipe's).")
@click.option("--max-ppl-ratio", type=float, help="Gate: PPL(model)/PPL(reference) at most this (default: the recipe's).")
@click.option("--min-cosine", type=float, help="Gate: mean embedding cosine at least this (default: the recipe's).")
@click.option("--allow-overlap", is_flag=True, help="Measure even when the text overlaps the calibration text.")
@click.option("--json", "json_path", metavar="FILE", help="Write the record as JSON to FILE ('-' for stdout only).")
def verify(artifact, reference, data, seq_len, windows, sentences, top_k, cache_dir, no_cache, max_kld, min_top1,
           max_ppl_ratio, min_cosine, allow_overlap, json_path) -> None:
    """Run an artifact (or a checkpoint) and measure its drift from the fp32 reference; gate on it.

    Example: edgeforge verify llama-int4.pte.d --reference ./Llama-3.2-1B --data wiki.test.raw --max-kld 0.05
    """
    from edgeforge.verify.report import format_verify_report
    from edgeforge.verify.verify import VerifyOptions, verify as run_verify

    given = {"seq_len": seq_len, "windows": windows, "sentences": sentences, "top_k": top_k, "cache_dir": cache_dir,
             "max_kld": max_kld, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio, "min_cosine": min_cosine}
    options = VerifyOptions(use_cache=not no_cache, allow_overlap=allow_overlap,
                            **{k: v for k, v in given.items() if v is not None})
    report = run_verify(artifact, reference, data, options, progress=_progress)
    if json_path != "-":
        click.echo(format_verify_report(report))
    _emit_json(report.to_record(), json_path)
    report.raise_for_gates()


@main.command()
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--reference", type=click.Path(path_type=str),
              help="fp32 checkpoint run eager beside it (default: the one the artifact's manifests name).")
@click.option("--prompt-lengths", metavar="N,N,...", help="Prefill tests, comma-separated token counts (default 16,64,256).")
@click.option("--decode-tokens", type=click.IntRange(1), help="Tokens per decode test (default 32).")
@click.option("--repetitions", "-r", type=click.IntRange(1), help="Timed rounds (default 5).")
@click.option("--warmup", type=click.IntRange(0), help="Untimed rounds first (default 1).")
@click.option("--threads", "-t", type=click.IntRange(1), help="CPU threads (default: every CPU this process may use).")
@click.option("--bandwidth-mib", type=click.IntRange(1), help="Working set of the bandwidth test (default: above 4x the last-level cache).")
@click.option("--json", "json_path", metavar="FILE", help="Write the record, raw samples included, as JSON to FILE ('-' for stdout only).")
def bench(artifact, reference, prompt_lengths, decode_tokens, repetitions, warmup, threads, bandwidth_mib,
          json_path) -> None:
    """Measure load time, TTFT, prefill and decode tokens/s, peak RSS and the bandwidth ceiling, beside the fp32 reference.

    Example: edgeforge bench llama-int4.pte.d --prompt-lengths 16,128 -r 5 --json bench.json
    """
    from edgeforge.verify.bench import BenchSettings, bench as run_bench, format_bench

    settings = BenchSettings.from_options(prompt_lengths=prompt_lengths, decode_tokens=decode_tokens,
                                          repetitions=repetitions, warmup=warmup, threads=threads,
                                          bandwidth_bytes=bandwidth_mib and bandwidth_mib * 2**20)
    record = run_bench(artifact, reference=reference, settings=settings, progress=_progress)
    if json_path != "-":
        click.echo(format_bench(record))
    _emit_json(record.to_dict(), json_path)


@main.command()
@_checkpoint_argument()
@click.option("--recipe", "-r", default="int4-gptq", show_default=True, help="Recipe name or TOML path.")
@click.option("--target", "-t", default="host", show_default=True, help="Target profile name or TOML path.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Forge directory (reruns resume in it).")
@click.option("--calib", type=click.Path(path_type=str), help="Calibration text (default: bundled TinyStories sample).")
@click.option("--data", type=click.Path(path_type=str), help="Evaluation text (default: bundled TinyStories sample, disjoint).")
@click.option("--samples", type=click.IntRange(1), help="Calibration samples (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(2), help="Tokens per calibration sample (default: the recipe's).")
@click.option("--max-seq-len", type=click.IntRange(1), help="KV-cache length of the exported decoder.")
@click.option("--eval-windows", default=32, show_default=True, type=click.IntRange(1), help="Evaluation windows for verify.")
@click.option("--eval-seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per evaluation window.")
@click.option("--repetitions", default=5, show_default=True, type=click.IntRange(1), help="Timed repetitions in bench.")
def forge(checkpoint, recipe, target, output, calib, data, samples, seq_len, max_seq_len, eval_windows, eval_seq_len,
          repetitions) -> None:
    """Quantize -> export -> verify -> bench -> report in one command; unchanged stages are reused on a rerun.

    Example: edgeforge forge --recipe int4-gptq --target host -o forge-out
    """
    from edgeforge.pipeline import ForgeSettings, forge as run_forge

    settings = ForgeSettings(recipe=recipe, target=target, checkpoint=checkpoint, calib=calib, data=data,
                             samples=samples, seq_len=seq_len, max_seq_len=max_seq_len, eval_seq_len=eval_seq_len,
                             eval_windows=eval_windows, repetitions=repetitions)
    result = run_forge(settings, output, progress=_progress)
    click.echo(format_forge_summary(result))
    verify = result.report["verify"] or {}
    if verify.get("verdict") == "fail":
        from edgeforge.errors import GateFailed

        raise GateFailed(verify.get("verdict_line", "a gate failed"))


def format_forge_summary(result) -> str:
    """The headline figures of a forge run."""
    report = result.report
    export, verify, bench = report["export"], report["verify"] or {}, report["bench"] or {}
    lines = [f"artifact  {export['artifact']} ({export['format']}, {export['scheme']}, "
             f"{export['report']['size_bytes']:,} bytes)"]
    drift = verify.get("drift")
    if drift:
        lines.append(f"drift     ppl {drift['ppl_ref']:.3f} -> {drift['ppl_test']:.3f} (x{drift['ppl_ratio']:.4f}), "
                     f"KLD {drift['kld_mean_nats']:.5f} ± {drift['kld_mean_nats_sem']:.5f}, "
                     f"same top token {drift['top1_agreement']:.2%}")
    for model in bench.get("models", []):
        decode = [t for t in model["tests"] if t["name"].startswith("tg")]
        if decode:
            lines.append(f"decode    {model['role']:<9} {decode[0]['tok_s']['median']:.1f} tok/s "
                         f"(median ± IQR {decode[0]['tok_s']['iqr']:.1f}, n={decode[0]['tok_s']['n']})")
    lines.append(f"verdict   {verify.get('verdict_line', 'not run')}")
    lines.append(f"report    {result.output_dir / 'report.html'}"
                 + (f" (reused: {', '.join(result.reused)})" if result.reused else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
