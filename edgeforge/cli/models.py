"""Commands on a checkpoint as it is: inspect, generate."""

from __future__ import annotations

import click

from edgeforge.cli import RegistryChoice, main, _checkpoint_argument, _open, _emit_json


@main.command()
@_checkpoint_argument()
@click.option("--format", "format_", type=RegistryChoice("edgeforge.checkpoints.base:FORMATS"),
              help="Force a checkpoint format instead of detecting it.")
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
@click.option("--prompt", "-p", default="", show_default=True,
              help="Text to continue, encoded as the tokenizer defines (BOS only if it adds one).")
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
    from edgeforge.checkpoints.tokenizers import TOKENIZER_FILES, end_of_sequence_ids
    from edgeforge.errors import InputError
    from edgeforge.generate import generate as run_generation
    from edgeforge.models import architecture

    ckpt = _open(checkpoint)
    if not architecture(ckpt.architecture).generates_text:
        raise InputError(f"generate needs a decoder; this is a {ckpt.architecture} encoder", path=ckpt.path)
    if ckpt.tokenizer is None:
        raise InputError(f"no tokenizer ({TOKENIZER_FILES}) beside the checkpoint", path=ckpt.path)
    tokenizer, model = ckpt.tokenizer, load_model(ckpt)
    prompt_ids = tokenizer.encode(prompt)  # BOS as the tokenizer adds it
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
                   eos_ids=end_of_sequence_ids(tokenizer), on_token=stream)
    elapsed = time.perf_counter() - start
    click.echo()
    click.echo(f"{len(new_ids)} tokens in {elapsed:.2f} s ({len(new_ids) / elapsed:.1f} tok/s, prompt "
               f"{len(prompt_ids)} tokens, fp32 eager)", err=True)
