"""Measurement commands: verify (drift), bench (latency)."""

from __future__ import annotations

import click

from edgeforge.cli import RegistryChoice, main, _progress, _emit_json
from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.runners import DEFAULT_RUNNER, RUNNERS


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
@click.option("--no-eager", is_flag=True,
              help="Decoder artifacts: skip running the source quantized checkpoint eagerly, and its max_kld_eager gate.")
@click.option("--allow-overlap", is_flag=True, help="Measure even when the text overlaps the calibration text.")
@click.option("--farm", type=click.Path(path_type=str), help="A farm TOML (as bench's): with --device, run the artifact there.")
@click.option("--device", "device_expression", metavar="NAME",
              help="With --farm: the device whose runtime computes the artifact's logits, e.g. --device pi5.")
@click.option("--json", "json_path", metavar="FILE", help="Write the record as JSON to FILE ('-' for stdout only).")
def verify(artifact, reference, data, seq_len, windows, sentences, top_k, cache_dir, no_cache, max_kld, min_top1,
           max_ppl_ratio, min_cosine, no_eager, allow_overlap, farm, device_expression, json_path) -> None:
    """Run an artifact (or a checkpoint) and measure its drift from the fp32 reference; gate on it.

    Example: edgeforge verify llama-int4.pte.d --reference ./Llama-3.2-1B --data wiki.test.raw --max-kld 0.05
    """
    from edgeforge.verify.report import format_verify_report
    from edgeforge.verify.verify import VerifyOptions, verify as run_verify

    given = {"seq_len": seq_len, "windows": windows, "sentences": sentences, "top_k": top_k, "cache_dir": cache_dir,
             "max_kld": max_kld, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio, "min_cosine": min_cosine}
    options = VerifyOptions(use_cache=not no_cache, allow_overlap=allow_overlap, eager=not no_eager,
                            device=_farm_device(farm, device_expression),
                            **{k: v for k, v in given.items() if v is not None})
    report = run_verify(artifact, reference, data, options, progress=_progress)
    if json_path != "-":
        click.echo(format_verify_report(report))
    _emit_json(report.to_dict(), json_path)
    report.raise_for_gates()


def _farm_device(farm, expression):
    """verify --farm F --device NAME: the one device of F it names (None without --farm)."""
    from edgeforge.runners.farm import load_farm

    if (farm is None) != (expression is None):
        raise ConfigError("--farm and --device go together: the farm file, and the device of it to run on")
    if farm is None:
        return None
    devices = load_farm(farm).select(expression)
    if len(devices) > 1:
        raise ConfigError(f"--device {expression!r} matches {len(devices)} devices "
                          f"({', '.join(device.name for device in devices)}): verify runs on one", path=farm)
    return devices[0]


@main.command()
@click.argument("artifacts", metavar="ARTIFACT...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--reference", type=click.Path(path_type=str),
              help="fp32 checkpoint run eager beside it (default: the one the artifact's manifests name).")
@click.option("--prompt-lengths", metavar="N,N,...", help="Prefill tests, comma-separated token counts (default 16,64,256).")
@click.option("--decode-tokens", type=click.IntRange(1), help="Tokens per decode test (default 32).")
@click.option("--repetitions", "-r", type=click.IntRange(1), help="Timed rounds (default 5).")
@click.option("--warmup", type=click.IntRange(0), help="Untimed rounds first (default 1).")
@click.option("--warmup-s", type=click.FloatRange(0), help="Warm up for at least this many seconds too (default 0).")
@click.option("--cooldown-s", type=click.FloatRange(0), help="Sleep this long before each timed sample (default 0).")
@click.option("--max-temp-c", type=click.FloatRange(0, min_open=True),
              help="Before each timed sample, wait until the hottest thermal zone is under this (°C).")
@click.option("--max-temp-wait-s", type=click.FloatRange(0, min_open=True),
              help="The most the --max-temp-c gate waits before sampling anyway (default 300).")
@click.option("--threads", "-t", type=click.IntRange(1), help="CPU threads (default: every CPU this process may use).")
@click.option("--bandwidth-mib", type=click.IntRange(1), help="Working set of the bandwidth test (default: above 4x the last-level cache).")
@click.option("--runner", type=RegistryChoice(RUNNERS),
              help=f"Where the models run: a runner of the edgeforge.runners entry-point group (default {DEFAULT_RUNNER}).")
@click.option("--farm", type=click.Path(path_type=str),
              help="A farm TOML: bench every ARTIFACT on each of its devices, devices in parallel (the matrix).")
@click.option("--devices", "device_expression", metavar="EXPR",
              help="With --farm: only the devices matching every term, e.g. os=linux,soc=sm8650, or a device name.")
@click.option("--baseline", type=click.Path(path_type=str),
              help="With --farm: the artifact tok/s ratios are taken against on each device (default: the first).")
@click.option("--max-cv", type=click.FloatRange(0, min_open=True),
              help="With --farm: a figure whose coefficient of variation exceeds this is marked unstable (default 0.1).")
@click.option("--retries", type=click.IntRange(0), help="With --farm: new sessions on a device that fails (default 2).")
@click.option("--output-dir", "-o", type=click.Path(path_type=str),
              help="With --farm (required): each finished job is written here at once; a rerun skips those.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="With --farm: run each device's session on the Ray node offering edgeforge-device:NAME, e.g. --ray auto.")
@click.option("--json", "json_path", metavar="FILE", help="Write the record, raw samples included, as JSON to FILE ('-' for stdout only).")
def bench(artifacts, reference, prompt_lengths, decode_tokens, repetitions, warmup, warmup_s, cooldown_s, max_temp_c,
          max_temp_wait_s, threads, bandwidth_mib, runner, farm, device_expression, baseline, max_cv, retries,
          output_dir, json_path, ray_address) -> None:
    """Measure load time, TTFT, prefill and decode tokens/s, peak RSS and the bandwidth ceiling, beside the fp32 reference.

    Example: edgeforge bench llama-int4.pte.d --prompt-lengths 16,128 -r 5 --json bench.json

    With --farm: every ARTIFACT on every device, e.g. edgeforge bench a.pte.d b.pte.d --farm farm.toml -o runs/
    """
    from edgeforge.verify.bench import BenchSettings, bench as run_bench, format_bench

    settings = BenchSettings.from_options(prompt_lengths=prompt_lengths, decode_tokens=decode_tokens,
                                          repetitions=repetitions, warmup=warmup, warmup_s=warmup_s,
                                          cooldown_s=cooldown_s, max_temp_c=max_temp_c,
                                          max_temp_wait_s=max_temp_wait_s, threads=threads,
                                          bandwidth_bytes=bandwidth_mib and bandwidth_mib * 2**20)
    farm_only = {"--devices": device_expression, "--baseline": baseline, "--max-cv": max_cv, "--retries": retries,
                 "--output-dir": output_dir, "--ray": ray_address}
    if farm is not None:
        if reference is not None or runner is not None:
            raise ConfigError("--reference and --runner do not apply with --farm (give the reference as an ARTIFACT; "
                              "each device's kind names its runner)")
        return _bench_matrix(artifacts, farm, device_expression, settings, baseline, max_cv, retries, output_dir,
                             json_path, ray_address)
    if len(artifacts) > 1 or any(value is not None for value in farm_only.values()):
        used = [name for name, value in farm_only.items() if value is not None]
        raise ConfigError(f"{'several ARTIFACTs' if len(artifacts) > 1 else ', '.join(used)}: only with --farm")
    record = run_bench(artifacts[0], reference=reference, settings=settings, runner=runner, progress=_progress)
    if json_path != "-":
        click.echo(format_bench(record))
    _emit_json(record.to_dict(), json_path)


def _bench_matrix(artifacts, farm, device_expression, settings, baseline, max_cv, retries, output_dir,
                  json_path, ray_address) -> None:
    """bench --farm: the matrix's table, record and page (matrix.html); exit 3 after them if a device failed on
    every attempt."""
    from contextlib import nullcontext
    from pathlib import Path

    from edgeforge.report.matrix_html import MATRIX_HTML, write_matrix_html
    from edgeforge.runners.farm import load_farm
    from edgeforge.verify.matrix_ray import RaySessions
    from edgeforge.verify.matrix import DEFAULT_MAX_CV, DEFAULT_RETRIES, bench_matrix, format_matrix

    if output_dir is None:
        raise ConfigError("--farm needs --output-dir: every finished job is written there as it finishes")
    devices = load_farm(farm).select(device_expression)
    with RaySessions(ray_address) if ray_address is not None else nullcontext() as run_session:
        record = bench_matrix(list(artifacts), devices, output_dir, settings=settings, baseline=baseline,
                              max_cv=DEFAULT_MAX_CV if max_cv is None else max_cv,
                              retries=DEFAULT_RETRIES if retries is None else retries, progress=_progress,
                              run_session=run_session)
    write_matrix_html(record, Path(output_dir) / MATRIX_HTML)
    if json_path != "-":
        click.echo(format_matrix(record))
    _emit_json(record.to_dict(), json_path)
    if record.failures:
        raise RuntimeFailure(f"{', '.join(failure.device for failure in record.failures)} failed on every attempt; "
                             f"their jobs were not written and a rerun with the same -o tries them again")
