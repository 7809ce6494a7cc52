"""Text generation through the static KV cache: a sanity check that a model and tokenizer work."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from edgeforge.errors import ConfigError


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             seed: int | None = None, eos_ids: Collection[int] = (),
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Prefill ``prompt_ids`` in one call, then decode one token at a time.

    Greedy (argmax) when ``temperature`` is 0, otherwise softmax sampling seeded by ``seed``.
    Stops after ``max_new_tokens`` or at any of ``eos_ids``. Returns only the new tokens.
    """
    if not prompt_ids:
        raise ConfigError("the prompt is empty and the tokenizer adds no BOS token")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    total = len(prompt_ids) + max_new_tokens
    context = model.config.max_seq_len
    if total > context:
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds the "
                          f"model's context of {context}")
    model.setup_cache(1, total)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids)))[0, -1]
    new_tokens: list[int] = []
    for position in range(len(prompt_ids), total):
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids or position == total - 1:
            break
        logits = model(torch.tensor([[token]]), torch.tensor([position]))[0, -1]
    return new_tokens


@torch.no_grad()
def teacher_forced_shortfall(forward, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Per chosen token: ``forward``'s best logit minus its logit of that token, after the same prefix (prefill
    the prompt, then one token per call from its end: a model with a fresh cache, or a session). 0 everywhere
    means ``tokens`` are ``forward``'s own greedy choices; one near-tie cannot make every later token differ."""
    steps = [forward(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids)))[0, -1]]
    for position, token in enumerate(tokens[:-1], start=len(prompt_ids)):
        steps.append(forward(torch.tensor([[token]]), torch.tensor([position]))[0, -1])
    logits = torch.stack(steps).double()
    chosen = logits.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
    return logits.max(-1).values - chosen
